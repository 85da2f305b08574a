"""Bad input through the real server (ComfyUI 0.30 and 0.3.75, --cpu): every crafted generator file
(tests/crafted_files.py), wrong or empty generator names, images, instructions, batch indices,
float and combo inputs. Each case must be refused with a message that says what is wrong and what to do, log
at most one traceback, keep the server's memory bounded, and leave the server able to run the
next valid prompt."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import requests

import crafted_files
import hywu_graphs as g

pytestmark = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile)

MB = 1024 * 1024
_seeds = itertools.count(5000)


def _queue_raw(srv, prompt) -> requests.Response:
    """POST /prompt with NaN/Infinity allowed in the JSON (what a script may send)."""
    body = json.dumps({"prompt": prompt, "client_id": srv.client_id}, allow_nan=True)
    return requests.post(srv.url + "/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=60)


def _validation_text(data: dict) -> str:
    parts = [json.dumps(data.get("error", {}))]
    for node in (data.get("node_errors") or {}).values():
        for e in node.get("errors", []):
            parts.append(f"{e.get('message')}: {e.get('details')}")
    return "\n".join(parts)


def _lora_graph(generator=None, prefix="loras/hywu_never"):
    """Load Generator -> Generate LoRA -> Save LoRA, with Condition Encode not linked to the
    generator: its output stays cached between the failing prompts and the canaries."""
    wf = g.lora_only("canary instruction", prefix, generator=generator)
    del wf["4"]["inputs"]["generator"]
    return wf


def _canary(srv) -> None:
    """The next valid prompt loads the generator, generates and saves a LoRA, and logs no
    routine HY-WU lines."""
    n = next(_seeds)
    start = len(srv.log_tail(10 ** 9))
    entry = srv.run(_lora_graph(prefix=f"loras/hywu_canary_{n}"), timeout=300)
    assert entry["status"]["status_str"] == "success", "the server did not run the next prompt"
    assert list((srv.output_dir / "loras").glob(f"hywu_canary_{n}_*.safetensors")), "no LoRA saved"
    lines = srv.log_tail(10 ** 9)[start:].splitlines()
    chatter = [l for l in lines if l.startswith("HY-WU") and not l.startswith("HY-WU: loaded generator")]
    assert not chatter, f"routine log lines at INFO: {chatter}"  # a (re)load is logged once, nothing else


def refused(srv, prompt, needles, stage="execution", bounded_memory=False) -> str:
    """Queue ``prompt``; it must be refused at ``stage`` ("validation": POST /prompt answers 400;
    "execution": the prompt fails in a node) with every needle in the message. Returns the message."""
    can_reset = srv.reset_peak_rss()
    rss0 = srv.rss()
    start = len(srv.log_tail(10 ** 9))
    r = _queue_raw(srv, prompt)
    if stage == "validation":
        assert r.status_code == 400, f"expected a validation error, got {r.status_code}: {r.text[:500]}"
        msg = _validation_text(r.json())
    else:
        assert r.status_code == 200, f"rejected at validation: {r.text[:2000]}"
        entry = srv.wait(r.json()["prompt_id"], timeout=300, raise_on_error=False)
        err = srv.execution_error(entry)
        assert err, f"the prompt did not fail: {entry['status']}"
        msg = err["exception_message"]
        log = srv.log_tail(10 ** 9)[start:]
        assert log.count("Traceback (most recent call last)") == 1, f"not one traceback:\n{log[-4000:]}"
        assert "During handling of the above exception" not in log and "direct cause" not in log
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in the message:\n{msg}"
    assert str(srv.base_dir) not in msg, f"the message shows a server path:\n{msg}"
    growth = (srv.rss("VmHWM") if can_reset else srv.rss()) - rss0
    if bounded_memory:
        print(f"peak RSS growth {growth / MB:.1f} MB")
        assert growth < 200 * MB, f"server memory grew by {growth / MB:.0f} MB"
    _canary(srv)
    return msg


@pytest.fixture(scope="module")
def crafted(hywu_env):
    srv = hywu_env.server
    good = srv.models_dir / "hywu" / hywu_env.generators["seeded"]
    return {k: p.name for k, p in crafted_files.make_all(good.resolve(), srv.models_dir / "hywu").items()}


# ---------------------------------------------------------------------------------------------
# generator files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(crafted_files.CASES))
def test_crafted_generator_file(hywu_env, crafted, case):
    srv = hywu_env.server
    name = crafted[case]
    msg = refused(srv, _lora_graph(generator=name),
                  ["HY-WU Load Generator", f"models/hywu/{name}", *crafted_files.CASES[case][1]], bounded_memory=True)
    if case not in ("zip_pickle", "raw_pickle"):
        assert "pickle" not in msg.lower(), msg


def test_misspelled_generator_name_is_refused_at_validation(hywu_env):
    seeded = hywu_env.generators["seeded"]
    refused(hywu_env.server, g.demo(generator=seeded.replace("seeded", "seedd")),
            ["not in models/hywu", "Did you mean", seeded, "press R"], stage="validation")


def test_unknown_generator_name_lists_the_files(hywu_env):
    refused(hywu_env.server, g.demo(generator="zzzz.safetensors"),
            ["'zzzz.safetensors' is not in models/hywu", "Pick one of: hywu_", "or put the file into ComfyUI/models/hywu/"],
            stage="validation")


@pytest.mark.parametrize("name", ["", "  \t"], ids=["empty", "whitespace"])
def test_empty_generator_name_says_none_was_picked(hywu_env, name):
    msg = refused(hywu_env.server, g.demo(generator=name), ["no generator was picked", "Pick one of: hywu_"],
                  stage="validation")
    assert "not a .safetensors file" not in msg and "pickle" not in msg.lower(), msg


def test_empty_generator_name_with_an_empty_folder(tmp_path):
    """In-process (the session server's models/hywu is not empty): ComfyUI's own folder_paths
    with the hywu folder pointed at an empty directory."""
    import comfy_harness

    comfy_harness.import_comfy(extra_modules=("folder_paths", "comfy_api.latest", "comfy.model_patcher",
                                              "hywu_nodes.nodes.load_generator"))
    import folder_paths

    from hywu_nodes.nodes.load_generator import HYWULoadGenerator

    saved = folder_paths.folder_names_and_paths.get("hywu")
    try:
        folder_paths.folder_names_and_paths["hywu"] = ([str(tmp_path)], {".safetensors"})
        folder_paths.filename_list_cache.pop("hywu", None)
        msg = HYWULoadGenerator.validate_inputs(generator_name=" ")
    finally:
        if saved is not None:
            folder_paths.folder_names_and_paths["hywu"] = saved
        folder_paths.filename_list_cache.pop("hywu", None)
    for needle in ["no generator was picked", "models/hywu/ has no generator files yet", "python -m trainer.train",
                   "make demo", "press R"]:
        assert needle in msg, msg


def test_generator_name_that_is_a_number(hywu_env):
    refused(hywu_env.server, g.demo(generator=5), ["generator_name is 5", "not a file name", "Pick a generator"],
            stage="validation")


def test_missing_generator_name_is_reported_by_comfyui(hywu_env):
    wf = g.demo()
    del wf["3"]["inputs"]["generator_name"]
    msg = refused(hywu_env.server, wf, ["Required input is missing", "generator_name"], stage="validation")
    assert "TypeError" not in msg and "Exception" not in msg


def test_pickled_generator_is_refused_at_validation(hywu_env):
    refused(hywu_env.server, g.demo(generator=hywu_env.bad_files["pickle"]),
            ["not a .safetensors file", "never loaded", "can run code"], stage="validation")


def test_generator_that_overflows_is_stopped_before_a_black_image(hywu_env):
    """Finite weights so large that the generated LoRA overflows: Generate LoRA says so."""
    srv = hywu_env.server
    good = (srv.models_dir / "hywu" / hywu_env.generators["seeded"]).resolve()
    name = "hywu_overflow.safetensors"
    make = crafted_files.tensor_edit(lambda t: t.update({"head_b.weight": t["head_b.weight"].sign() * 3e38}))
    make(good, srv.models_dir / "hywu" / name)
    refused(srv, g.demo(generator=name), ["HY-WU Generate LoRA", "NaN or infinite values", "black image",
                                          "--force-fp32"])


def test_generator_for_another_base_condition(hywu_env):
    # a Flux Kontext generator (T5 width 4096) in the SD1.5 graph: Condition Encode says so
    refused(hywu_env.server, g.demo(generator=hywu_env.generators["flux"]),
            ["flux_kontext", "width 4096", "768", "Connect the text encoder"])


def test_generator_for_another_base_apply(hywu_env):
    # a Flux Kontext generator whose condition fits the SD1.5 encoders: Apply finds no matching key
    refused(hywu_env.server, g.demo(generator=hywu_env.generators["flux_sd15cond"]),
            ["none of the", "flux_kontext", "SD15_instructpix2pix", "load the checkpoint"])


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def _with_test_image(batch=1, size=64, channels=3, fill="noise"):
    wf = g.lora_only("make it snowy", "loras/hywu_never")
    wf["20"] = {"class_type": "HYWUTestImage", "inputs": {"batch": batch, "size": size, "channels": channels,
                                                          "fill": fill}}
    wf["4"]["inputs"]["image"] = ["20", 0]
    return wf


@pytest.mark.parametrize("kwargs,needles", [
    (dict(channels=1), ["one channel", "Load Image"]),
    (dict(channels=2), ["2 channels", "RGB", "Load Image"]),
    (dict(channels=5), ["5 channels", "RGB"]),
    (dict(batch=0), ["image batch is empty", "Load Image"]),
    (dict(size=4), ["4x4 pixels", "at least 8x8"]),
    (dict(fill="nan"), ["NaN or infinite pixel values", "check it"]),
    (dict(fill="inf"), ["NaN or infinite pixel values"]),
], ids=["1ch", "2ch", "5ch", "empty", "tiny", "nan", "inf"])
def test_bad_image(hywu_env, kwargs, needles):
    refused(hywu_env.server, _with_test_image(**kwargs), ["HY-WU Condition Encode", *needles])


def test_image_with_alpha(hywu_env):
    wf = g.demo()
    wf["20"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["2", 0], "alpha": ["2", 1]}}
    wf["4"]["inputs"]["image"] = ["20", 0]
    refused(hywu_env.server, wf, ["alpha channel", "Split Image with Alpha"])


def test_missing_vae_is_reported_by_comfyui(hywu_env):
    wf = g.demo()
    del wf["4"]["inputs"]["vae"]
    refused(hywu_env.server, wf, ["Required input is missing", "vae"], stage="validation")


# ---------------------------------------------------------------------------------------------
# instructions
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   \n\t "], ids=["empty", "whitespace"])
def test_empty_instruction(hywu_env, text):
    refused(hywu_env.server, g.demo(instruction=text), ["instruction is empty", "Type what should change"])


def test_long_instruction_runs_and_warns(hywu_env):
    srv = hywu_env.server
    start = len(srv.log_tail(10 ** 9))
    n = next(_seeds)
    entry = srv.run(g.lora_only(" ".join(["snow"] * 200) + f" {n}", f"loras/hywu_long_{n}"), timeout=300)
    assert entry["status"]["status_str"] == "success"
    assert "truncated to the first 77" in srv.log_tail(10 ** 9)[start:]


# ---------------------------------------------------------------------------------------------
# batch and float inputs
# ---------------------------------------------------------------------------------------------
def test_batch_index_beyond_the_batch(hywu_env):
    wf = g.demo(batch_index=2)
    wf["20"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 2}}
    wf["4"]["inputs"]["image"] = ["20", 0]
    refused(hywu_env.server, wf, ["batch_index is 2", "holds 2 LoRA", "Set batch_index to 0..1"])


def test_negative_batch_index(hywu_env):
    # -1 means "all LoRAs, one per sample" (runtime mode); below that is refused
    refused(hywu_env.server, g.demo(batch_index=-2), ["smaller than min of -1", "batch_index"], stage="validation")


def test_latent_batch_that_does_not_fit_the_loras(hywu_env):
    wf = g.demo(instruction=["make it snowy", "make it night", "make it red"])  # three LoRAs, runtime mode
    wf["8"]["inputs"]["pixels"] = ["2", 0]  # one source image -> one latent
    refused(hywu_env.server, wf, ["1 latent", "3 LoRAs", "image output", "batch_index"])


def test_lines_for_another_number_of_images(hywu_env):
    wf = g.demo(instruction=["make it snowy", "make it night", "make it red"])
    wf["20"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 2}}
    wf["4"]["inputs"]["image"] = ["20", 0]
    refused(hywu_env.server, wf, ["3 instructions", "2 images", "line i edits image i"])


def test_several_loras_in_patch_mode(hywu_env):
    wf = g.demo(batch_index=-1, mode="patch")
    wf["20"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["2", 0], "amount": 2}}
    wf["4"]["inputs"]["image"] = ["20", 0]
    refused(hywu_env.server, wf, ["holds 2 LoRAs", "patch mode", "runtime"])


def test_mode_outside_the_list_is_refused_at_validation(hywu_env):
    # ComfyUI 0.3.75 does not check a V3 combo's options for API prompts: the node does, before any model loads
    refused(hywu_env.server, g.demo(mode="bypass"),
            ["HY-WU Apply Generated LoRA", "mode is 'bypass'", "'runtime', 'patch'", "Pick one"], stage="validation")


def _combo_inputs(info) -> list[tuple[str, str, list]]:
    out = []
    for node, d in info.items():
        if d.get("category") != "HY-WU":
            continue
        for section in ("required", "optional"):
            for name, spec in d["input"].get(section, {}).items():
                if spec[0] == "COMBO":
                    out.append((node, name, spec[1]["options"]))
                elif isinstance(spec[0], list):
                    out.append((node, name, spec[0]))
    return out


def test_every_combo_input_of_the_pack_is_checked_at_validation(hywu_env):
    """Every COMBO widget of every HY-WU node (new ones too) refuses a value outside its list,
    and a non-string, at POST /prompt, naming the input."""
    combos = _combo_inputs(hywu_env.server.object_info())
    assert {(n, i) for n, i, _ in combos} >= {("HYWUApplyGeneratedLoRA", "mode"), ("HYWULoadGenerator", "generator_name")}
    graph_node = {v["class_type"]: k for k, v in g.demo().items()}
    for node, name, options in combos:
        assert node in graph_node, f"{node}.{name}: add the node to this test's graph"
        for bad in ("zz_not_an_option", 7):
            assert bad not in options
            wf = g.demo()
            wf[graph_node[node]]["inputs"][name] = bad
            r = _queue_raw(hywu_env.server, wf)
            assert r.status_code == 400, f"{node}.{name}={bad!r} accepted: {r.text[:300]}"
            text = _validation_text(r.json())
            assert name in text and repr(bad) in text, f"{node}.{name}={bad!r}: {text}"


@pytest.mark.parametrize("value,needles", [
    (math.nan, ["strength is nan", "finite number from -10 to 10"]),
    (math.inf, ["strength is inf", "finite number from -10 to 10"]),
    (-math.inf, ["strength is -inf", "finite number"]),
    ("nan", ["strength is nan", "finite"]),
    (10.5, ["strength is 10.5", "from -10 to 10"]),
    ("strong", ["Failed to convert an input value to a FLOAT value", "strength"]),
], ids=["nan", "inf", "-inf", "nan-text", "above-max", "text"])
def test_bad_strength(hywu_env, value, needles):
    refused(hywu_env.server, g.demo(strength=value), needles, stage="validation")


def test_non_finite_linked_strength(hywu_env):
    wf = g.demo()
    wf["20"] = {"class_type": "PrimitiveFloat", "inputs": {"value": math.nan}}
    wf["6"]["inputs"]["strength"] = ["20", 0]
    refused(hywu_env.server, wf, ["HY-WU Apply Generated LoRA", "strength is nan", "finite number"])


def test_every_float_input_of_the_pack_refuses_nan(hywu_env):
    """The rule covers every FLOAT widget of every HY-WU node (new ones too): NaN is refused."""
    info = hywu_env.server.object_info()
    floats = [(node, name) for node, d in info.items() if d.get("category") == "HY-WU"
              for section in ("required", "optional") for name, spec in d["input"].get(section, {}).items()
              if spec[0] == "FLOAT"]
    assert ("HYWUApplyGeneratedLoRA", "strength") in floats
    graph_node = {v["class_type"]: k for k, v in g.demo().items()}
    for node, name in floats:
        assert node in graph_node, f"{node}.{name}: add the node to this test's graph"
        wf = g.demo()
        wf[graph_node[node]]["inputs"][name] = math.nan
        r = _queue_raw(hywu_env.server, wf)
        assert r.status_code == 400 and "finite" in _validation_text(r.json()), f"{node}.{name} accepted NaN"
