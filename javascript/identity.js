// sd-webui-identity: mark the unit tabs whose unit is enabled ("Unit 2 ●"), so a glance at the
// accordion shows which units will run. Everything here is prefixed: the page shares one namespace.
(function () {
    function identityUnitBoxes() {
        const out = [];
        for (const tab of ["txt2img", "img2img"]) {
            for (let n = 1; n <= 8; n++) {
                const box = gradioApp().querySelector(`#identity_${tab}_unit${n}_enabled input[type=checkbox]`);
                const panel = gradioApp().getElementById(`identity_${tab}_unit${n}`);
                if (!box || !panel) break;
                out.push({ n, box, panel });
            }
        }
        return out;
    }

    function identityMarkTabs() {
        for (const { n, box, panel } of identityUnitBoxes()) {
            const button = panel.parentElement.querySelectorAll(":scope > .tab-nav > button")[n - 1];
            const label = `Unit ${n}` + (box.checked ? " \u25cf" : "");
            if (button && button.textContent !== label) button.textContent = label;
        }
    }

    onUiLoaded(function () {
        // a click on the checkbox changes no DOM that onUiUpdate would see: listen to it directly
        for (const { box } of identityUnitBoxes()) box.addEventListener("change", () => setTimeout(identityMarkTabs, 0));
        identityMarkTabs();
    });
    onUiUpdate(identityMarkTabs);  // pasted infotext, tab switches re-render the buttons
})();
