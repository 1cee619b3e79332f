"""Likeness through the WebUI glue (stand-in ``modules``, the real ldm UNet, a FaceID unit, the real
insightface code on insightface's group photo with a small ONNX pack in ``models/insightface/models/buffalo_l``).

What a user would notice: each image's infotext says ``Identity 1 likeness: 0.92`` (the number a
direct computation gives) or ``no face``; a batch's grid carries none; the entry changes no unit
when pasted; each image costs one face analysis; the setting turns it off; with a mask the face in
the region counts; after an X/Y/Z plot the console and the grid's infotext carry the table.
"""

import base64
import io
import json
import os
import types
from types import SimpleNamespace

import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
from PIL import Image, ImageDraw  # noqa: E402

import face_models as fm  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402
from faceid_helpers import write_faceid  # noqa: E402
from handoff import Wrapper, denoise, new_p  # noqa: E402
from unet_helpers import CONTEXT, unet_inputs  # noqa: E402
from unet_models import SD15, build_ldm_unet, randomize_  # noqa: E402

BY_SIZE = sorted(fm.T1_FACES, key=lambda f: -f.size)
FLAT = Image.new("RGB", (640, 443), (128, 128, 128))  # the test detector finds no face without texture


def b64(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def t1():
    return Image.open(fm.insightface_image("t1.jpg")).convert("RGB")


@pytest.fixture(scope="module")
def output(t1):
    return fm.coarse_noise(t1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The UNet, a FaceID file and the face pack, made once for the module."""
    root = tmp_path_factory.mktemp("likeness")
    unet = randomize_(build_ldm_unet(SD15, context_dim=CONTEXT[SD15]), seed=3).eval()
    folder = root / "identity-models"
    folder.mkdir()
    adapter = write_faceid(folder, unet, "faceid", seed=1)
    fm.write_pack(str(root / "models" / "insightface" / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    return SimpleNamespace(unet=unet, folder=folder, adapter=adapter.stem, models=root / "models")


@pytest.fixture
def webui(monkeypatch, files):
    from lib_identity import discovery
    from lib_identity.encoders import default_face_cache
    from lib_identity.webui import runtime

    model = SimpleNamespace(is_sdxl=False, is_sd1=True, model=Wrapper(files.unet))
    callbacks = install_fake_modules(monkeypatch, models_path=files.models, identity_models_dir=str(files.folder),
                                     sd_model=model)
    discovery.list_models([str(files.folder)], refresh=True)
    default_face_cache().clear()
    yield SimpleNamespace(model=model, callbacks=callbacks, adapter=files.adapter, runtime=runtime,
                          opts=__import__("modules.shared", fromlist=["opts"]).opts)
    runtime.cleanup()


def infotext_params(p, index, use_main_prompt=False):
    """What the WebUI's ``create_infotext`` makes of ``p.extra_generation_params``: callables are called
    with its locals (``p``, ``index`` in the batch, ``use_main_prompt`` for a batch's grid), None is left out."""
    out = {}
    for key, value in p.extra_generation_params.items():
        if callable(value):
            value = value(p=p, index=0 if use_main_prompt else index, use_main_prompt=use_main_prompt,
                          iteration=p.iteration, position_in_batch=index, all_prompts=["a photo"])
        if value is not None:
            out[key] = value
    return out


def generate(env, units, images, p=None, sample=True):
    """One generation as ``process_images`` runs it: process, sampling (the units analyse their
    pictures), then per finished image the script's after-composite hook and the image's infotext."""
    from lib_identity.webui.script import IdentityScript

    def run_sampler(*a, **k):
        env.runtime.before_sampling(p)
        denoise(env, *unet_inputs(2, CONTEXT[SD15]), n_cond=1)

    p = p or new_p(env.model, None)
    p.sample = run_sampler
    env.runtime.process(p, units)
    if sample:
        p.sample()
    p.iteration, texts = 0, []
    for i, image in enumerate(images):
        p.batch_index = i
        IdentityScript().postprocess_image_after_composite(p, SimpleNamespace(image=image))
        texts.append(infotext_params(p, i))
    grid = infotext_params(p, 0, use_main_prompt=True)
    env.runtime.finish(p)
    return texts, grid


def expected(output, chosen, face=None):
    """The direct computation: the best (or ``face``'s) cosine to the ``chosen`` face of t1."""
    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    reference = fm.placed_embedding(t1, chosen)
    return max(float(fm.placed_embedding(output, f) @ reference) for f in ([face] if face else fm.T1_FACES))


def test_each_image_says_its_likeness_in_infotext_and_one_analysis_each(webui, t1, output):
    from lib_identity.encoders.faces import analysis_count
    from lib_identity.units import expand_infotext, units_from_infotext

    unit = {"model": webui.adapter, "images": [b64(t1)], "face": 2}
    generate(webui, [unit], [])  # the unit's pictures are analysed (and cached) as in every run
    runs = analysis_count()
    p = new_p(webui.model, None)
    texts, grid = generate(webui, [unit], [output, FLAT, output], p=p, sample=False)
    assert analysis_count() - runs == 3  # one analysis per output image, none for the cached reference
    value = expected(output, BY_SIZE[2])
    assert texts[0]["Identity 1 likeness"] == f"{value:.2f}" == texts[2]["Identity 1 likeness"]
    assert 0.5 < value < 0.98
    assert texts[1]["Identity 1 likeness"] == "no face"
    assert "Identity 1 likeness" not in grid  # a batch's grid stands for several images
    # after the run, the parameters the API sends as JSON hold the first image's number, not a function
    assert json.loads(json.dumps(p.extra_generation_params, default=lambda o: None))["Identity 1 likeness"] == texts[0]["Identity 1 likeness"]

    # another face of the same pictures is another reference, another number
    texts, _ = generate(webui, [dict(unit, face="largest")], [output], sample=False)
    assert texts[0]["Identity 1 likeness"] == f"{expected(output, BY_SIZE[0]):.2f}" != f"{value:.2f}"

    # pasted back, the entry changes no unit
    pasted = dict(texts[0])
    without = {k: v for k, v in pasted.items() if k != "Identity 1 likeness"}
    assert units_from_infotext(pasted) == units_from_infotext(without)
    assert expand_infotext(dict(pasted), unit_count=3) == expand_infotext(dict(without), unit_count=3)


def test_the_setting_off_measures_nothing(webui, t1, output):
    from lib_identity.encoders.faces import analysis_count

    unit = {"model": webui.adapter, "images": [b64(t1)]}
    webui.opts.data["identity_likeness"] = False
    runs = analysis_count()
    texts, _ = generate(webui, [unit], [output, FLAT], sample=False)
    assert analysis_count() == runs
    assert not any(k.endswith("likeness") for t in texts for k in t)
    webui.opts.data["identity_likeness"] = True
    texts, _ = generate(webui, [unit], [output], sample=False)
    assert "Identity 1 likeness" in texts[0]


def test_with_a_mask_the_face_in_the_units_region_counts(webui, t1, output):
    standing = fm.T1_FACES[4]  # top right: not the best match of face 2 in the whole picture
    mask = Image.new("L", t1.size, 0)
    x0, y0, x1, y1 = standing.box()
    ImageDraw.Draw(mask).rectangle([x0 - 10, y0 - 10, x1 + 10, y1 + 10], fill=255)
    unit = {"model": webui.adapter, "images": [b64(t1)], "face": 2, "mask": b64(mask)}
    texts, _ = generate(webui, [unit], [output], sample=False)
    in_region = expected(output, BY_SIZE[2], face=standing)
    assert texts[0]["Identity 1 likeness"] == f"{in_region:.2f}"
    assert in_region < expected(output, BY_SIZE[2]) - 0.05


def fake_xyz_module():
    """The WebUI's scripts/xyz_grid.py as far as the table goes: ``draw_xyz_grid`` with its parameters,
    and ``run``'s ``cell`` closure that writes ``grid_infotext`` after the first cell."""
    module = types.ModuleType("xyz_grid.py")
    module.axis_options = []
    module.AxisOption = lambda label, type, apply, confirm=None, choices=None: SimpleNamespace(label=label, apply=apply)

    def draw_xyz_grid(p, xs, ys, zs, x_labels, y_labels, z_labels, cell, draw_legend, include_lone_images,
                      include_sub_grids, first_axes_processed, second_axes_processed, margin_size):
        for iz, z in enumerate(zs):
            for iy, y in enumerate(ys):
                for ix, x in enumerate(xs):
                    cell(x, y, z, ix, iy, iz)
        return "processed"

    module.draw_xyz_grid = draw_xyz_grid
    return module


def test_an_xyz_plot_prints_the_table_and_the_grid_infotext_carries_it(webui, t1, output, monkeypatch, capsys):
    from lib_identity.webui import xyz

    module = fake_xyz_module()
    scripts = types.ModuleType("modules.scripts")
    scripts.scripts_data = [SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=module)]
    monkeypatch.setitem(__import__("sys").modules, "modules.scripts", scripts)
    xyz.register()
    xyz.register()  # a second UI load wraps nothing twice
    weight_axis = next(o for o in module.axis_options if o.label == "[Identity] Unit 1 weight")

    unit = {"model": webui.adapter, "images": [b64(t1)], "face": 2}
    outputs = {0.5: [output], 1.0: [FLAT]}  # what each cell "generates"
    shared = {}
    grid_infotext = [None, None]

    def cell(x, y, z, ix, iy, iz):
        p = new_p(webui.model, None)
        p.extra_generation_params = shared  # X/Y/Z's copy(p) shares it between cells
        weight_axis.apply(p, x, None)
        texts, _ = generate(webui, [unit], outputs[x], p=p, sample=False)
        if grid_infotext[0] is None:  # made from the cell's parameters after its run, as the script does
            grid_infotext[0] = ", ".join(f"{k}: {v}" for k, v in infotext_params(p, 0).items())
        return texts

    module.draw_xyz_grid(SimpleNamespace(), xs=[0.5, 1.0], ys=[0], zs=[0], x_labels=["weight: 0.5", "weight: 1"],
                         y_labels=[""], z_labels=[""], cell=cell, draw_legend=True, include_lone_images=False,
                         include_sub_grids=False, first_axes_processed="z", second_axes_processed="y", margin_size=0)
    value = f"{expected(output, BY_SIZE[2]):.2f}"
    printed = capsys.readouterr().out
    table = ["  weight: 0.5 | weight: 1", f"  {value.ljust(11)} | no face"]
    assert "\n".join(["unit 1:"] + table) in printed
    head, sep, quoted = grid_infotext[0].partition(", Identity likeness table: ")
    assert sep and "weight: 0.5" in head and f"Identity 1 likeness: {value}" in head
    assert json.loads(quoted).splitlines()[1:] == ["unit 1:"] + table


WEBUI_ROOT = os.environ.get("SD_WEBUI_ROOT", "")


@pytest.mark.skipif(not os.path.isfile(os.path.join(WEBUI_ROOT, "scripts", "xyz_grid.py")),
                    reason="SD_WEBUI_ROOT does not point at a WebUI checkout")
def test_the_webuis_xyz_script_has_what_the_table_relies_on():
    """Read (not run) the WebUI's scripts/xyz_grid.py: ``draw_xyz_grid`` takes the labels and ``cell``, and
    ``run``'s ``cell`` closes over the ``grid_infotext`` list that becomes the grid's infotexts afterwards."""
    import ast
    import textwrap

    from lib_identity.webui import xyz_likeness

    source = open(os.path.join(WEBUI_ROOT, "scripts", "xyz_grid.py"), encoding="utf-8").read()
    tree = ast.parse(source)
    draw = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "draw_xyz_grid")
    names = [a.arg for a in draw.args.args]
    assert {"cell", "x_labels", "y_labels", "z_labels"} <= set(names)
    run = next(n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body
               if isinstance(n, ast.FunctionDef) and n.name == "run")
    cell_node = next(n for n in ast.walk(run) if isinstance(n, ast.FunctionDef) and n.name == "cell")
    # the WebUI's own cell function, in an enclosing function that has the list: the same closure
    probe = "def probe():\n    grid_infotext = ['grid']\n" + textwrap.indent(
        textwrap.dedent(ast.get_source_segment(source, cell_node)), "    ") + "\n    return cell\n"
    namespace = {}
    exec(compile(probe, "xyz_grid.py", "exec"), namespace)
    cell = namespace["probe"]()
    assert xyz_likeness.grid_infotexts(cell) == ["grid"]
    # ... and it is read after draw_xyz_grid returns
    assert source.index("grid_infotext[:1 + z_count]") > source.index("processed = draw_xyz_grid(")
