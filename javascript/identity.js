// sd-webui-identity: mark the unit tabs whose unit is enabled ("Unit 2 ●"), so a glance at the
// accordion shows which units will run. Everything here is prefixed: the page shares one namespace.
(function () {
    function identityMarkTabs() {
        for (const tab of ["txt2img", "img2img"]) {
            for (let n = 1; n <= 8; n++) {
                const box = gradioApp().querySelector(`#identity_${tab}_unit${n}_enabled input[type=checkbox]`);
                if (!box) break;
                const panel = gradioApp().getElementById(`identity_${tab}_unit${n}`);
                const buttons = panel && panel.parentElement ? panel.parentElement.querySelectorAll(":scope > .tab-nav > button") : [];
                const button = buttons[n - 1];
                if (!button) continue;
                const label = `Unit ${n}` + (box.checked ? " \u25cf" : "");
                if (button.textContent !== label) button.textContent = label;
            }
        }
    }
    onUiUpdate(identityMarkTabs);
})();
