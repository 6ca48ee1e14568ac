"""Distribution: the Hub community-pipeline folder, the model card, copy-paste and pip use, all offline.

Every way a user can get the pipeline is exercised end to end on a tiny model (load, `invert`, one
prompt-to-prompt edit): diffusers' `custom_pipeline=` with the file, with the published folder, through `from_pipe`
and from a Hugging Face cache snapshot under `HF_HUB_OFFLINE=1`; the file copied into a user's project; and the
pip package. Anything that depends on `sys.modules` (copy-paste, two custom pipelines in one process, the
installed package) runs in a fresh interpreter.
"""

import copy
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, scene_image, tiny_components
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.utils.dynamic_modules_utils import get_relative_imports
from huggingface_hub.errors import OfflineModeIsEnabled

from negative_prompt_inversion.pipeline_negative_prompt_inversion import NegativePromptInversionPipeline


PIPELINE_FILE = ROOT / "pipeline_negative_prompt_inversion.py"
CLASS_NAME = "NegativePromptInversionPipeline"
STEPS = 3
SOURCE = "a red cat on a white background"
TARGET = "a red dog on a white background"  # a word swap: the edit goes through the attention-processor leaves
SUBPROCESS_TIMEOUT = 300


def _load_publish_hub():
    spec = importlib.util.spec_from_file_location("publish_hub", ROOT / "scripts" / "publish_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


publish_hub = _load_publish_hub()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(components, tmp_path_factory):
    """A tiny Stable Diffusion model folder, as `StableDiffusionPipeline.save_pretrained` writes it."""
    folder = tmp_path_factory.mktemp("tiny-sd") / "model"
    sd_pipeline(components).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    return publish_hub.build_hub_folder(tmp_path_factory.mktemp("publish") / "hub", repo_id="user/npi")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "scene.png"
    PIL.Image.fromarray(scene_image(0)).save(path)
    return path


def sd_pipeline(components):
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def invert_and_edit(pipe):
    pipe.set_progress_bar_config(disable=True)
    inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    output = pipe(
        prompt=TARGET,
        inversion=inversion,
        attention_control=pipe.PromptToPrompt(cross_replace_steps=0.4),
        output_type="np",
    )
    assert output.images.shape == (1, 32, 32, 3)
    assert np.isfinite(output.images).all()
    return output


def load(model, custom_pipeline, **kwargs):
    return DiffusionPipeline.from_pretrained(
        model, custom_pipeline=str(custom_pipeline), trust_remote_code=True, **kwargs
    )


# =================================================================================================================
# The published folder and the model card


def test_published_folder_holds_exactly_what_diffusers_fetches(hub_folder):
    leaves = {
        "/".join(name.split(".")) + ".py" for name in get_relative_imports(PIPELINE_FILE)
    }  # diffusers' own scan of the main file
    assert leaves and all(leaf.startswith("attention_processors/npi_") for leaf in leaves)
    assert set(publish_hub.sibling_files(PIPELINE_FILE)) == leaves

    files = {path.relative_to(hub_folder).as_posix() for path in hub_folder.rglob("*") if path.is_file()}
    expected = {"pipeline.py", PIPELINE_FILE.name, "README.md", "publish_info.json"} | leaves
    assert files == expected  # no attention_processors/__init__.py: diffusers neither copies nor runs it
    for name in ("pipeline.py", PIPELINE_FILE.name):
        assert (hub_folder / name).read_bytes() == PIPELINE_FILE.read_bytes()
    for leaf in leaves:
        assert (hub_folder / leaf).read_bytes() == (ROOT / leaf).read_bytes()

    info = json.loads((hub_folder / "publish_info.json").read_text())
    assert info["pipeline_class"] == CLASS_NAME and info["repo_id"] == "user/npi"
    assert set(info["files"]) == expected - {"publish_info.json"}
    readme = (hub_folder / "README.md").read_text()
    assert "user/npi" in readme and "<user>/" not in readme
    assert huggingface_hub.ModelCard(readme).data.library_name == "diffusers"


@pytest.mark.parametrize(
    "main, leaf, problem",
    [
        ("from . import helpers\n", None, "from . import"),
        ("from .pkg.sub.leaf import x\n", None, "deeper"),
        ("from .attention_processors.missing import x\n", None, "does not exist"),
        ("from .attention_processors.leaf import x\n", "from .other import y\n", "imports relatively"),
        (
            "from .attention_processors.leaf import (\n    x,\n)\nif True: from .attention_processors.leaf2 import y\n",
            "",
            "differ",
        ),
    ],
    ids=["from-dot-import", "too-deep", "missing-leaf", "leaf-imports-relatively", "scan-mismatch"],
)
def test_publish_refuses_layouts_diffusers_cannot_load(tmp_path, main, leaf, problem):
    (tmp_path / "attention_processors").mkdir()
    if leaf is not None:
        (tmp_path / "attention_processors" / "leaf.py").write_text(leaf)
    pipeline_file = tmp_path / "pipeline_x.py"
    pipeline_file.write_text(main)
    with pytest.raises(publish_hub.LayoutError, match=problem):
        publish_hub.sibling_files(pipeline_file)


def test_publish_cli_dry_run(tmp_path, capsys):
    out = tmp_path / "hub"
    assert publish_hub.main(["--out", str(out)]) == 0
    assert publish_hub.main(["--out", str(out), "--repo-id", "me/npi"]) == 0  # rewrites its own output
    assert "me/npi" in (out / "README.md").read_text()
    assert "dry run" in capsys.readouterr().out

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not ours")
    assert publish_hub.main(["--out", str(foreign)]) == 1
    assert (foreign / "keep.txt").exists()
    with pytest.raises(SystemExit):
        publish_hub.parse_args(["--push"])  # --push needs --repo-id
    with pytest.raises(SystemExit):
        publish_hub.parse_args(["--repo-id", "no-slash"])


def test_model_card_metadata_and_coverage():
    text = (ROOT / "model_card.md").read_text()
    data = huggingface_hub.ModelCard(text).data
    assert data.library_name == "diffusers"
    assert data.pipeline_tag == "image-to-image"
    assert data.license == "apache-2.0"
    required_tags = {
        "custom_code",
        "diffusers",
        "image-editing",
        "prompt-to-prompt",
        "negative-prompt-inversion",
        "null-text-inversion",
    }
    assert required_tags <= set(data.tags)
    assert {"stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1-base"} <= set(
        data.base_model
    )

    # Every user-facing argument is documented, so the card cannot silently fall behind the code.
    components = {
        "self",
        "vae",
        "text_encoder",
        "tokenizer",
        "unet",
        "scheduler",
        "safety_checker",
        "feature_extractor",
    }
    for function in (
        NegativePromptInversionPipeline.__init__,
        NegativePromptInversionPipeline.invert,
        NegativePromptInversionPipeline.__call__,
    ):
        undocumented = [
            name
            for name in inspect.signature(function).parameters
            if name not in components and f"`{name}`" not in text
        ]
        assert not undocumented, f"model_card.md does not document {function.__name__}({', '.join(undocumented)})"

    for snippet in (
        'custom_pipeline="<user>/negative-prompt-inversion"',
        "trust_remote_code=True",
        "snapshot_download(",
        "custom_pipeline=path",
        "HF_HUB_OFFLINE=1",
        "model_info()",
        "attention_processors/",
        "pip install negative-prompt-inversion",
        "from negative_prompt_inversion import",
        ".from_pipe(",
        "benchmarks/speed.py",
        "SDXL",
    ):
        assert snippet in text, snippet
    for arxiv_id in ("2305.16807", "2208.01626", "2306.05414"):
        assert arxiv_id in text
    assert text.count("@inproceedings") + text.count("@article") == 5


# =================================================================================================================
# diffusers' loaders, in this process


def test_custom_pipeline_file(model_dir):
    pipe = load(model_dir, PIPELINE_FILE)
    assert type(pipe).__name__ == CLASS_NAME
    assert type(pipe).__module__ == "diffusers_modules.local.pipeline_negative_prompt_inversion"
    invert_and_edit(pipe)


def test_custom_pipeline_published_folder(model_dir, hub_folder):
    pipe = load(model_dir, hub_folder)  # a folder: diffusers loads its pipeline.py
    assert type(pipe).__name__ == CLASS_NAME
    assert type(pipe).__module__ == "diffusers_modules.local.pipeline"
    invert_and_edit(pipe)


def test_custom_pipeline_checkout_folder(model_dir):
    """The README's quick start: the checkout itself is a custom-pipeline folder (its pipeline.py links to the file)."""
    pipe = load(model_dir, ROOT)
    assert type(pipe).__name__ == CLASS_NAME
    assert (ROOT / "pipeline.py").resolve() == PIPELINE_FILE.resolve()
    invert_and_edit(pipe)


def test_from_pipe_shares_the_weights(components):
    sd = sd_pipeline(copy.deepcopy(components))
    pipe = DiffusionPipeline.from_pipe(
        sd, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True, inversion_method="ddim"
    )
    assert type(pipe).__name__ == CLASS_NAME
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(pipe, name) is getattr(sd, name), name  # needs the type-annotated __init__
    assert pipe.config.inversion_method == "ddim"

    plain = NegativePromptInversionPipeline.from_pipe(sd)  # the pip / copy-paste form, with the default method
    assert plain.unet is sd.unet and plain.config.inversion_method == "direct"
    invert_and_edit(plain)


def test_from_pipe_with_custom_pipeline_runs(components):
    sd = sd_pipeline(copy.deepcopy(components))
    pipe = DiffusionPipeline.from_pipe(sd, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    # DiffusionPipeline.from_pipe reads `_optional_components` from DiffusionPipeline, not from the custom class, so
    # it passes the absent safety_checker / feature_extractor as their config entries, `(None, None)`.
    assert (pipe.safety_checker, pipe.feature_extractor) == (None, None), "optional components arrived as config"
    invert_and_edit(pipe)


def _lay_out_as_hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """Copy ``folder`` into ``cache`` the way `snapshot_download` stores a model repo: blobs + symlinked snapshot."""
    import hashlib

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
            shutil.copyfile(blob, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_offline_snapshot_download_then_local_path(model_dir, hub_folder, tmp_path):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: no request can leave this process
    cache = tmp_path / "hub-cache"
    snapshot = _lay_out_as_hub_cache(hub_folder, cache, "user/npi")

    path = huggingface_hub.snapshot_download("user/npi", cache_dir=cache)
    assert Path(path) == snapshot
    pipe = load(model_dir, path)
    assert type(pipe).__name__ == CLASS_NAME
    invert_and_edit(pipe)
    # The uniquely named copy, recommended next to other folder-loaded custom pipelines.
    named = load(model_dir, Path(path) / PIPELINE_FILE.name)
    assert type(named).__module__ == "diffusers_modules.local.pipeline_negative_prompt_inversion"

    # Why the card says so: by repo id, diffusers asks the Hub for the commit even when the code is cached.
    with pytest.raises(OfflineModeIsEnabled):
        load(model_dir, "user/npi", cache_dir=cache)


def test_hub_repo_id_with_the_commit_lookup_answered(model_dir, hub_folder, tmp_path, monkeypatch):
    """`custom_pipeline="user/npi"` end to end: files from the cache, only `model_info()` stands in for the Hub."""
    from types import SimpleNamespace

    from diffusers.utils import dynamic_modules_utils

    cache = tmp_path / "hub-cache"
    commit = _lay_out_as_hub_cache(hub_folder, cache, "user/npi").name
    monkeypatch.setattr(dynamic_modules_utils, "model_info", lambda *args, **kwargs: SimpleNamespace(sha=commit))
    pipe = load(model_dir, "user/npi", cache_dir=cache)
    assert type(pipe).__name__ == CLASS_NAME
    assert type(pipe).__module__ == f"diffusers_modules.local.user--npi.{commit}.pipeline"
    processor_module = sys.modules[type(pipe).__module__].ControlledAttnProcessor.__module__
    assert (
        processor_module == f"diffusers_modules.local.user--npi.{commit}.attention_processors.npi_controlled_attention"
    )
    invert_and_edit(pipe)


def test_save_pretrained_keeps_constructor_flags(components, tmp_path):
    flags = {"inversion_method": "nti", "null_text_inner_steps": 3, "proximal_guidance": "soft"}
    NegativePromptInversionPipeline(**copy.deepcopy(components), **flags).save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == CLASS_NAME
    assert {key: index[key] for key in flags} == flags

    loaded = load(tmp_path / "saved", PIPELINE_FILE)
    assert type(loaded).__name__ == CLASS_NAME
    assert {key: loaded.config[key] for key in flags} == flags
    loaded.set_progress_bar_config(disable=True)
    assert loaded.invert(scene_image(0), SOURCE, num_inference_steps=2).method == "nti"

    overridden = load(tmp_path / "saved", PIPELINE_FILE, inversion_method="ddim")
    assert overridden.config.inversion_method == "ddim"
    assert overridden.config.null_text_inner_steps == 3 and overridden.config.proximal_guidance == "soft"


@pytest.mark.parametrize("how", ["file", "folder", "from_pipe"])
def test_without_trust_remote_code_diffusers_refuses(how, model_dir, hub_folder, components):
    with pytest.raises(ValueError, match=r"trust_remote_code=True"):
        if how == "from_pipe":
            DiffusionPipeline.from_pipe(sd_pipeline(components), custom_pipeline=str(PIPELINE_FILE))
        else:
            target = PIPELINE_FILE if how == "file" else hub_folder
            DiffusionPipeline.from_pretrained(model_dir, custom_pipeline=str(target))


# =================================================================================================================
# One inversion, several pipelines: reloads of the file, save_pretrained, other dtypes


def latents_of_edit(pipe, inversion):
    return pipe(
        prompt=TARGET,
        inversion=inversion,
        attention_control=pipe.PromptToPrompt(cross_replace_steps=0.4),
        output_type="latent",
    ).images


@pytest.mark.parametrize("first, second", [("npi", "nti"), ("nti", "npi")])
def test_inversions_work_across_pipelines_loaded_from_one_file(model_dir, first, second):
    """Comparing two methods in one notebook: every `from_pretrained` re-executes the file and rebinds
    `InversionResult`, so the inversion made before the second load is an instance of an older, equal class."""
    a = load(model_dir, PIPELINE_FILE, inversion_method=first, null_text_inner_steps=1)
    a.set_progress_bar_config(disable=True)
    inversion_a = a.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    before = latents_of_edit(a, inversion_a)
    b = load(model_dir, PIPELINE_FILE, inversion_method=second, null_text_inner_steps=1)
    b.set_progress_bar_config(disable=True)
    inversion_b = b.invert(scene_image(1), SOURCE, num_inference_steps=STEPS)
    assert type(inversion_a) is not type(inversion_b)  # the situation this test is about

    assert torch.equal(latents_of_edit(a, inversion_a), before)
    for pipe, inversion in ((a, inversion_b), (b, inversion_a)):
        assert torch.isfinite(latents_of_edit(pipe, inversion)).all()
    impostor = type("InversionResult", (), {})()  # the name alone does not make an inversion
    with pytest.raises(TypeError, match="inversion must be an InversionResult"):
        latents_of_edit(b, impostor)


def test_inversion_survives_save_pretrained_and_reload(tokenizer_dir, tmp_path):
    pipe = NegativePromptInversionPipeline(**tiny_components(tokenizer_dir))  # never saved (shared ones may be)
    pipe.set_progress_bar_config(disable=True)
    inversion = pipe.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    inversion.save(tmp_path / "inversion.safetensors")
    expected = latents_of_edit(pipe, inversion)
    pipe.save_pretrained(tmp_path / "saved")  # adds `architectures` and `dtype` to the text encoder's config
    assert torch.equal(latents_of_edit(pipe, inversion), expected)

    reloaded = load(tmp_path / "saved", PIPELINE_FILE)
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(
        latents_of_edit(reloaded, reloaded.load_inversion(tmp_path / "inversion.safetensors")), expected
    )


@pytest.mark.parametrize(
    "invert_dtype, edit_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_inversion_crosses_float32_and_bfloat16_loads(model_dir, invert_dtype, edit_dtype):
    inverter = load(model_dir, PIPELINE_FILE, dtype=invert_dtype)
    editor = load(model_dir, PIPELINE_FILE, dtype=edit_dtype)
    inverter.set_progress_bar_config(disable=True)
    editor.set_progress_bar_config(disable=True)
    inversion = inverter.invert(scene_image(0), SOURCE, num_inference_steps=STEPS)
    assert inversion.latents.dtype == torch.float32
    assert torch.isfinite(latents_of_edit(editor, inversion).float()).all()


# =================================================================================================================
# Fresh interpreters: copy-paste, two custom pipelines in one process, the pip package.
# Each starts a Python that imports torch and diffusers (seconds of CPU), so all of them start together, in the
# background, when this module's first test runs, and each test waits for its own.

PRELUDE = """
import json, sys
import numpy as np, PIL.Image
cfg = json.loads(sys.argv[1])

def invert_and_edit(pipe):
    pipe.set_progress_bar_config(disable=True)
    inversion = pipe.invert(PIL.Image.open(cfg["image"]), cfg["source"], num_inference_steps=cfg["steps"])
    control = pipe.PromptToPrompt(cross_replace_steps=0.4)  # a loaded custom pipeline offers no module to import
    images = pipe(prompt=cfg["target"], inversion=inversion, attention_control=control, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all(), images.shape

def stray_top_level():
    # Top-level copies of our modules: present only when the copy-paste fallback import ran.
    roots = ("attention_processors", "pipeline_negative_prompt_inversion")
    return sorted(name for name in sys.modules if name.split(".")[0] in roots)
"""

COPY_PASTE_PACKAGE = """
sys.path.insert(0, cfg["project_root"])
from myproj.editing.pipeline_negative_prompt_inversion import NegativePromptInversionPipeline as Pipeline
module = sys.modules[Pipeline.__module__]
pipe = Pipeline.from_pretrained(cfg["model_dir"])
invert_and_edit(pipe)
processor = module.ControlledAttnProcessor.__module__
print(json.dumps({"module": Pipeline.__module__, "processor": processor, "stray": stray_top_level(),
                  "processor_file": sys.modules[processor].__file__}))
"""

COPY_PASTE_TOP_LEVEL = """
sys.path.insert(0, cfg["folder"])
import pipeline_negative_prompt_inversion as module
pipe = module.NegativePromptInversionPipeline.from_pretrained(cfg["model_dir"])
invert_and_edit(pipe)
processor = module.ControlledAttnProcessor.__module__
print(json.dumps({"file": module.__file__, "processor": processor, "processor_file": sys.modules[processor].__file__,
                  "stray": stray_top_level()}))
"""

OTHER_PIPELINE = """
from diffusers import DiffusionPipeline

from .attention_processors.controlled_attention import ControlledAttnProcessor
from .attention_processors.prompt_to_prompt import MARK


class OtherEditPipeline(DiffusionPipeline):
    # Somebody else's community pipeline, with generically named attention-processor leaves.

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def __call__(self):
        return f"{MARK}/{ControlledAttnProcessor.MARK}"
"""

TWO_PIPELINES = """
import inspect
from diffusers import DiffusionPipeline

def load(which):  # "other" (a folder), "ours" (our file), "ours_folder" (the published folder)
    return DiffusionPipeline.from_pretrained(cfg["model_dir"], custom_pipeline=cfg[which], trust_remote_code=True)

pipes = {which: load(which) for which in cfg["order"]}
ours, other = pipes["ours"], pipes["other"]
invert_and_edit(ours)
module = sys.modules[type(ours).__module__]
names = ("ControlledAttnProcessor", "CrossAttentionControl", "AttentionStore", "MutualSelfAttention")
result = {"ours": type(ours).__name__, "other": type(other).__name__, "other_call": other(),
          "ours_module": type(ours).__module__, "processor_module": module.ControlledAttnProcessor.__module__,
          "leaves": {name: inspect.getfile(getattr(module, name)) for name in names}, "stray": stray_top_level()}
# Last, as it rewrites the namespace of the other folder-loaded pipeline: ours from a folder after it.
if cfg["order"][0] == "other":
    try:
        result["folder_after_folder"] = type(load("ours_folder")).__name__
    except ValueError as error:
        result["folder_after_folder"] = str(error)
print(json.dumps(result))
"""

PIP_IMPORT = """
import negative_prompt_inversion as package
from negative_prompt_inversion import InversionResult, NegativePromptInversionPipeline
stray = stray_top_level()
pipe = NegativePromptInversionPipeline.from_pretrained(cfg["model_dir"])
invert_and_edit(pipe)
module = sys.modules[NegativePromptInversionPipeline.__module__]
print(json.dumps({"file": package.__file__, "names": sorted(package.__all__), "stray": stray,
                  "processor": module.ControlledAttnProcessor.__module__, "result": InversionResult.__module__}))
"""


def run_python(script, cfg, workdir: Path, pythonpath=None):
    """Run ``PRELUDE + script`` in a fresh interpreter (offline, own module cache); return its last JSON line."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    home = workdir / "hf-home"
    env.update(
        HF_HOME=str(home),
        HF_MODULES_CACHE=str(home / "modules"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    cfg = {
        "source": SOURCE,
        "target": TARGET,
        "steps": STEPS,
        **{key: str(value) if isinstance(value, Path) else value for key, value in cfg.items()},
    }
    result = subprocess.run(  # cwd: a folder with none of our modules, as sys.path[0] is the cwd under -c
        [sys.executable, "-c", PRELUDE + script, json.dumps(cfg)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def pip_install_and_import(model_dir: Path, image_file: Path, workdir: Path):
    """``pip install --target`` a copy of the repository; list what landed; import and run it from there."""
    source = workdir / "src"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".hypothesis",
            ".pytest_cache",
            "outputs",
        ),
    )  # a copy: the build writes build/ and *.egg-info next to its sources
    target = workdir / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    package = target / "negative_prompt_inversion"
    listing = {
        "top_level": sorted(
            path.name for path in target.iterdir() if not path.name.endswith(".dist-info") and path.name != "bin"
        ),  # bin: console scripts
        "scripts": sorted(path.name for path in (target / "bin").iterdir()) if (target / "bin").is_dir() else [],
        "installed": sorted(
            path.relative_to(package).as_posix()
            for path in package.rglob("*")
            if path.suffix in (".py", ".safetensors")
        ),
        "package": str(package),
    }
    run_dir = workdir / "run"
    run_dir.mkdir()
    return {**listing, **run_python(PIP_IMPORT, {"model_dir": model_dir, "image": image_file}, run_dir, target)}


@pytest.fixture(scope="module")
def copied_project(tmp_path_factory):
    """The user copies the pipeline file and the attention_processors folder into their own package."""
    root = tmp_path_factory.mktemp("user-project")
    editing = root / "myproj" / "editing"
    editing.mkdir(parents=True)
    for package in (root / "myproj", editing):
        (package / "__init__.py").write_text("")
    shutil.copyfile(PIPELINE_FILE, editing / PIPELINE_FILE.name)
    shutil.copytree(
        ROOT / "attention_processors",
        editing / "attention_processors",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return editing


@pytest.fixture(scope="module")
def other_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other-community-pipeline")
    (folder / "attention_processors").mkdir()
    (folder / "pipeline.py").write_text(OTHER_PIPELINE)
    (folder / "attention_processors" / "prompt_to_prompt.py").write_text('MARK = "other-p2p"\n')
    (folder / "attention_processors" / "controlled_attention.py").write_text(
        'class ControlledAttnProcessor:\n    MARK = "other-processor"\n'
    )
    return folder


class Background:
    """Fresh-interpreter jobs by name: started together in threads, each awaited by the tests that need it."""

    def __init__(self, jobs: dict, needed: set):
        self.jobs = jobs
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(needed)))
        self.futures = {name: self.pool.submit(jobs[name]) for name in needed}

    def result(self, name):
        if name not in self.futures:  # not foreseen from the selected tests: run it now
            self.futures[name] = self.pool.submit(self.jobs[name])
        return self.futures[name].result()


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory, model_dir, image_file, hub_folder, copied_project, other_pipeline):
    def two_pipelines(order):
        cfg = {
            "order": order,
            "other": other_pipeline,
            "ours": hub_folder / PIPELINE_FILE.name,
            "ours_folder": hub_folder,
            "model_dir": model_dir,
            "image": image_file,
        }
        return lambda: run_python(TWO_PIPELINES, cfg, tmp_path_factory.mktemp("two-pipelines"))

    jobs = {
        "copy_paste_package": lambda: run_python(
            COPY_PASTE_PACKAGE,
            {"project_root": copied_project.parents[1], "model_dir": model_dir, "image": image_file},
            tmp_path_factory.mktemp("copy-paste-package"),
        ),
        "copy_paste_top_level": lambda: run_python(
            COPY_PASTE_TOP_LEVEL,
            {"folder": copied_project, "model_dir": model_dir, "image": image_file},
            tmp_path_factory.mktemp("copy-paste-top-level"),
        ),
        "other-first": two_pipelines(["other", "ours"]),
        "ours-first": two_pipelines(["ours", "other"]),
        "pip": lambda: pip_install_and_import(model_dir, image_file, tmp_path_factory.mktemp("pip")),
    }
    uses = {  # test -> jobs it reads
        "test_copy_paste_into_a_package": {"copy_paste_package"},
        "test_copy_paste_as_a_top_level_module": {"copy_paste_top_level"},
        "test_two_custom_pipelines_in_one_process": {"other-first", "ours-first"},
        "test_published_folder_loads_after_another_folder_pipeline": {"other-first"},
        "test_pip_install_ships_one_top_level_package": {"pip"},
    }
    if importlib.util.find_spec("setuptools") is None:
        uses.pop("test_pip_install_ships_one_top_level_package")
    selected = {item.originalname for item in request.session.items if item.path == request.path}
    jobs_running = Background(jobs, set().union(*(uses[name] for name in selected if name in uses)))
    yield jobs_running
    jobs_running.pool.shutdown(wait=True, cancel_futures=True)


def test_copy_paste_into_a_package(background, copied_project):
    result = background.result("copy_paste_package")
    assert result["module"] == "myproj.editing.pipeline_negative_prompt_inversion"
    assert result["processor"] == "myproj.editing.attention_processors.npi_controlled_attention"
    assert Path(result["processor_file"]).parent == copied_project / "attention_processors"
    assert result["stray"] == []  # the relative imports served it; the top-level fallback never ran


def test_copy_paste_as_a_top_level_module(background, copied_project):
    result = background.result("copy_paste_top_level")
    assert Path(result["file"]).parent == copied_project
    # the file acts as the package of its sibling folder: no generic top-level "attention_processors" is claimed
    assert result["processor"] == "pipeline_negative_prompt_inversion.attention_processors.npi_controlled_attention"
    assert Path(result["processor_file"]).parent == copied_project / "attention_processors"
    assert [name for name in result["stray"] if name.startswith("attention_processors")] == []


@pytest.mark.parametrize("order", ["other-first", "ours-first"])
def test_two_custom_pipelines_in_one_process(background, order, hub_folder):
    result = background.result(order)
    assert result["ours"] == CLASS_NAME and result["other"] == "OtherEditPipeline"
    assert result["other_call"] == "other-p2p/other-processor"  # theirs still sees its own leaves
    assert result["ours_module"] == "diffusers_modules.local.pipeline_negative_prompt_inversion"
    assert result["processor_module"] == "diffusers_modules.local.attention_processors.npi_controlled_attention"
    for name, file in result["leaves"].items():  # ours sees ours: byte-identical copies of the published leaves
        assert Path(file).name.startswith("npi_"), name
        assert Path(file).read_bytes() == (hub_folder / "attention_processors" / Path(file).name).read_bytes()
    assert result["stray"] == []


def test_published_folder_loads_after_another_folder_pipeline(background):
    assert background.result("other-first")["folder_after_folder"] == CLASS_NAME


def test_pip_install_ships_one_top_level_package(background):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("pip install --no-build-isolation needs setuptools in this environment (offline: no download)")
    result = background.result("pip")
    assert result["top_level"] == ["negative_prompt_inversion"]  # not attention_processors, tests, toy_world, ...
    installed = set(result["installed"])
    assert {
        PIPELINE_FILE.name,
        "__init__.py",
        "cli.py",
        "__main__.py",
        *publish_hub.sibling_files(PIPELINE_FILE),
    } <= installed
    # the product alone: its PIE-Bench module, never the research harness or the checkout's toy model
    assert "pie_bench.py" in installed and not any(name.startswith("toy_world/") for name in installed), installed
    assert result["scripts"] == ["npi-edit"]
    assert not any(
        name.split("/")[0] in ("tests", "benchmarks", "scripts") or name.endswith("conftest.py") for name in installed
    ), installed
    assert Path(result["file"]).parent == Path(result["package"])
    assert {CLASS_NAME, "InversionResult"} <= set(result["names"])
    assert result["result"] == "negative_prompt_inversion.pipeline_negative_prompt_inversion"
    assert result["processor"] == "negative_prompt_inversion.attention_processors.npi_controlled_attention"
    assert result["stray"] == []  # relative imports inside the package; nothing generic at the top level
