"""`sdexport run` and the Python API: every bad request is one line, refused before engines load; what
the runtime changes or ignores is said out loud; NaN is blamed on what produced it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from sdexport.errors import SdexportError
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.txt2img import GenerationRequest

# Bad input is refused the same way on any host; `--backend tensorrt` is refused as without it.
pytestmark = pytest.mark.usefixtures("without_gpu")


@pytest.fixture(scope="module")
def pipeline(tiny_engine_dir):
    return load_pipeline(tiny_engine_dir, "onnxruntime-cpu")


@pytest.fixture
def no_engines(monkeypatch):
    """Fail the test if anything tries to load engines: the refusal must come before that."""
    from sdexport.runtime import loading

    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("engines were loaded"))


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch 0: need at least 1 image per prompt"),
    (["--batch", "1000000000"], "1000000000 images in one run: at most 10000; run several times"),
    (["--height", "0"], "height 0 is outside the engines' profile"),
    (["--width", "100"], "width 100 must be a multiple of 16"),
    (["--height", "4096"], "height 4096 is outside the engines' profile"),
    (["--seed", "-1"], "seed -1: seeds are integers from 0 to 2^64-1"),
    (["--seed", str(2**64)], "seed 18446744073709551616: seeds are integers"),
    (["--seed", str(2**64 - 1), "--batch", "2"], ("--seed 18446744073709551615: image 2 of 2 would need seed "
                                                 "18446744073709551616, past the largest (2^64-1); pass --seed "
                                                 "18446744073709551614 or less")),
    (["-p", "  "], "prompt 2 of 2 is empty; give the text to generate from"),
    # split over three calls (at most 2 images each): counted over the whole run, refused before loading
    (["-p", "b", "-p", " ", "-p", "c", "-p", "d", "-p", "e"], "prompt 3 of 6 is empty"),
    (["--steps", "0"], "--steps 0: need at least 1 step"),
    (["--steps", "1001"], "the model was trained on 1000 timesteps"),
    (["--guidance", "nan"], "--guidance nan: need a finite number >= 0"),
    (["--guidance", "inf"], "--guidance inf: need a finite number >= 0"),
    (["--guidance", "-2"], "--guidance -2.0: need a finite number >= 0"),
    (["-p", "y", *["--guidance", "7"] * 3], "3 --guidance for 2 images: give one, or one per image"),
    (["-p", "y", "--guidance", "7", "--guidance", "1"], "guidance 7, 1: a call guides all its images or none"),
    # over the whole run, though the profile (at most 2 per call) would split 7, 7 from 1, 1
    (["--batch", "4", *[a for v in "7711" for a in ("--guidance", v)]], "guidance 7, 7, 1, 1: a call guides all"),
    (["--scheduler", "heun9"], "unknown scheduler 'heun9'"),
    (["--backend", "openvino"], "unknown backend 'openvino'"),
    (["--original-size", "1024x1024"], "SDXL conditioning, but this is an SD model"),
    (["-n", "a", "-n", "b", "-n", "c"], "--negative-prompt: give one value, or one per image (1)"),
    (["--steps", "abc"], "Invalid value for '--steps'"),
    (["--backend", "tensorrt"], "TensorRT is required"),
    (["-o", "/proc/x.png"], "cannot write in /proc"),
])
def test_bad_requests_are_refused_before_engines_load(tiny_engine_dir: Path, tmp_path: Path, no_engines, capsys,
                                                      args, message):
    out = tmp_path / "x.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", out, *args) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err and err.count("error:") == 1
    assert not out.exists()


def test_a_run_split_into_calls_whose_last_the_profile_refuses_says_so(engine_copy, tmp_path, capsys):
    """3 images in calls of 2 leave a last call of 1, which a profile of batch 2 alone refuses: it
    was "--batch 1 is outside the engines' profile", a batch nobody asked for."""
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["profile"]["batch"] = [2, 2, 2]
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("run", engine_copy, "-p", "x", "--batch", "3", "-o", tmp_path / "out.png") == 2
    assert capsys.readouterr().err.strip() == (
        "error: 3 images run in calls of 2, the last of 1, a batch the engines' profile does not take (batch must be "
        "in [2, 2]): ask for a multiple of 2 images, or re-export with a batch range from 1")
    assert run_cli("run", engine_copy, "-p", "x", "--batch", "1", "-o", tmp_path / "out.png") == 2
    assert "--batch 1 is outside the engines' profile" in capsys.readouterr().err  # (one call: as it was)


def test_a_seed_past_2_to_the_32_says_it_draws_its_low_bits_noise(tiny_engine_dir, tmp_path, capsys):
    """PyTorch's CPU generator reads a seed's low 32 bits alone (as diffusers' pipelines use it):
    the image is seed 1's, and run says so rather than let two seeds silently give one image."""
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "2", "--seed", "1", "-o", tmp_path / "one.png") == 0
    assert "low 32 bits" not in capsys.readouterr().err
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "2", "--seed", str(2**32 + 1),
                   "-o", tmp_path / "high.png") == 0
    said = " ".join(capsys.readouterr().err.split())
    assert f"--seed {2**32 + 1}: seeds from 2^32 on draw the noise of their low 32 bits" in said
    assert f"seed {2**32 + 1} draws seed 1's" in said
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "one.png")), np.asarray(Image.open(tmp_path / "high.png")))


def test_images_numbered_past_a_batch_are_named_as_not_this_runs(tiny_engine_dir, tmp_path, capsys):
    """An earlier batch of 4 left out-2.png and out-3.png beside this batch of 2: kept, and named."""
    for name in ("out-2.png", "out-3.png", "out-5.png"):
        (tmp_path / name).write_bytes(b"an earlier run's")
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "--batch", "2", "-o", tmp_path / "out.png") == 0
    said = " ".join(capsys.readouterr().err.split())
    assert (f"note: {tmp_path / 'out-2.png'}, {tmp_path / 'out-3.png'} (numbered past this run's 2 images) are not "
            "this run's: left as found") in said  # (up to the first gap)
    assert (tmp_path / "out-3.png").read_bytes() == b"an earlier run's"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "-o", tmp_path / "out.png") == 0
    assert "not this run's" not in capsys.readouterr().err  # one image is out.png: no numbering to mistake


def test_steps_the_scheduler_cannot_take_are_refused_before_engines_load(tiny_engine_dir, tmp_path, no_engines, capsys):
    """DPM++ 2M with 999 steps reaches timestep 1000 (past the 1000 trained ones) and returns NaN."""
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "999", "--scheduler", "dpmpp_2m",
                   "-o", tmp_path / "x.png") == 2
    assert "reaches timestep 1000 at 999 steps, outside the model's 1000 training timesteps (0 to 999)" in " ".join(capsys.readouterr().err.split())


def test_the_api_takes_a_path_as_text_and_refuses_a_closed_pipeline_or_a_missing_provider(tiny_engine_dir):
    pipe = load_pipeline(str(tiny_engine_dir), "onnxruntime-cpu")  # a str, as a caller types it
    pipe.close()
    with pytest.raises(SdexportError, match="^this pipeline was closed"):
        pipe(GenerationRequest(prompt="x", height=64, width=64))
    if not torch.cuda.is_available():  # the provider named, not torch's "requires CUDA support" from a stream
        with pytest.raises(SdexportError, match="CUDA"):
            load_pipeline(tiny_engine_dir, "onnxruntime-cuda")


def test_close_waits_for_a_call_in_flight_in_another_thread(tiny_engine_dir):
    """A server or GUI closing its pipeline at shutdown while a request runs: the call in flight
    ended with an AttributeError (its ONNX Runtime session released under it; a TensorRT context's
    memory would be freed while it ran). ``close`` waits for it; a call after it is refused; a
    close from inside a call (its on_step) is refused rather than waiting for itself."""
    import threading

    pipe = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    started, results = threading.Event(), []
    request = GenerationRequest(prompt="x", height=64, width=64, steps=12)
    worker = threading.Thread(target=lambda: results.append(pipe(request, on_step=lambda done, total: started.set())))
    worker.start()
    assert started.wait(60)
    pipe.close()  # while the call is at its first steps
    worker.join(60)
    assert len(results) == 1 and results[0].latents.shape == (1, 4, 8, 8)
    with pytest.raises(SdexportError, match="^this pipeline was closed"):
        pipe(request)
    inner = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    with pytest.raises(SdexportError, match=r"^close\(\) inside a call of this pipeline"):
        inner(request, on_step=lambda done, total: inner.close())
    assert not inner.closed  # (still usable: the refusal closed nothing)
    # a bounded wait: a call held up (here by its on_step) outlasts it, and the engines are kept
    held, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: inner(request, on_step=lambda done, total: held.set() or release.wait(60)))
    worker.start()
    assert held.wait(60)
    with pytest.raises(SdexportError, match=r"^close\(\): a call of this pipeline still runs after 0.2 s; its engines"):
        inner.close(timeout=0.2)
    # a call meanwhile is told the engines are kept until close() is called again: it was told they
    # were released, which close had just said was not so (an audit's finding), then that they would
    # be (a review's: nothing releases them but another close)
    try:
        with pytest.raises(SdexportError, match=r"^this pipeline was closed, but its engines are kept: close\(\) gave up "
                                                r"waiting for a running call; call close\(\) again once it has returned$"):
            inner(request)
    finally:
        release.set()  # (each step's on_step would wait a minute)
    worker.join(60)
    inner.close()  # now released, once; again: nothing more to do
    inner.close()
    with pytest.raises(SdexportError, match="^this pipeline was closed"):
        inner(request)


def test_a_close_interrupted_while_it_waits_leaves_the_engines_kept_and_says_so(tiny_engine_dir, monkeypatch):
    """Ctrl-C in close()'s wait left later calls told a close still waited ("being closed"), which
    nothing did any more: they are told the engines are kept until close() is called again."""
    pipe = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")

    def interrupted(predicate, timeout=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipe._settled, "wait_for", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipe.close()
    monkeypatch.undo()
    request = GenerationRequest(prompt="x", height=64, width=64, steps=2)
    with pytest.raises(SdexportError, match=r"^this pipeline was closed, but its engines are kept"):
        pipe(request)
    pipe.close()
    with pytest.raises(SdexportError, match="^this pipeline was closed"):
        pipe(request)


def test_saving_to_a_name_too_long_is_refused_in_one_line(tiny_engine_dir, tmp_path):
    """``result.save`` with a name past the file system's limit was an OSError traceback from its
    first stat (``run -o`` said it in one line)."""
    from sdexport.runtime.images import check_image_output

    with pytest.raises(SdexportError, match=r": File name too long; choose a shorter name$"):
        check_image_output(tmp_path / ("a" * 300 + ".png"), 1, "out.png")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime-cpu"])
def test_the_python_api_refuses_cuda_graphs_where_the_backend_has_none(tiny_engine_dir, backend):
    """``run --backend torch --cuda-graph`` is refused; ``load_pipeline(backend="torch",
    cuda_graph=True)`` loaded without them, unsaid."""
    with pytest.raises(SdexportError, match=f"^cuda_graph=True: for the tensorrt and onnxruntime-cuda backends, not {backend}$"):
        load_pipeline(tiny_engine_dir, backend, cuda_graph=True)
    if backend == "onnxruntime-cpu":  # asked as "onnxruntime", which is the CPU's here: said so
        with pytest.raises(SdexportError, match=r"not onnxruntime-cpu \(onnxruntime is onnxruntime-cpu here: no CUDA"):
            load_pipeline(tiny_engine_dir, "onnxruntime", cuda_graph=True)
        with pytest.raises(SdexportError, match="^loras: expected a list of LoraFile entries, got int 5$"):
            load_pipeline(tiny_engine_dir, backend, loras=5)  # type: ignore[arg-type]


def test_texts_given_as_tuples_are_held_as_the_lists_their_types_say():
    """``prompt`` became a list, the negatives and second texts stayed tuples (typed lists: an
    ``append`` that type-checks failed at run time)."""
    request = GenerationRequest(prompt=("a", "b"), negative_prompt=("x", "y"), prompt_2=("c", "d"),
                                negative_prompt_2=("z", "w"))
    assert all(type(getattr(request, name)) is list
               for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"))


def test_a_pipeline_per_thread_loads_in_a_fresh_process(tiny_engine_dir):
    """The README's way to run calls side by side, a pipeline per thread: in a process that had not
    imported the libraries yet, 2 of 3 threads failed to load ("cannot import name 'CLIPTokenizer'",
    or the scheduler "not a diffusers scheduler"), their lazy modules resolving one name at once."""
    import subprocess
    import sys

    script = (
        "import sys, threading\n"
        "from sdexport.runtime.loading import load_pipeline\n"
        "failed = []\n"
        "def load():\n"
        "    try:\n"
        f"        load_pipeline({str(tiny_engine_dir)!r}, 'onnxruntime-cpu')\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{type(exc).__name__}: {exc}')\n"
        "threads = [threading.Thread(target=load) for _ in range(3)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(failed); sys.exit(bool(failed))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_a_child_forked_while_a_thread_loads_can_load():
    """The loads' lock, copied into a child held by another thread's load, would never be let go
    there (a preloading server's workers; multiprocessing's fork start)."""
    import subprocess
    import sys

    script = (
        "import os, threading\n"
        "from sdexport.runtime import loading\n"
        "held, release = threading.Event(), threading.Event()\n"
        "def load():\n"
        "    with loading._LOADS:\n"
        "        held.set(); release.wait(30)\n"
        "threading.Thread(target=load).start(); held.wait(30)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if loading._LOADS.acquire(timeout=5) else 1)\n"
        "release.set(); print(os.waitpid(pid, 0)[1])\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", script], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == "0", done.stdout + done.stderr


def test_calls_from_several_threads_take_turns_and_a_call_inside_a_call_is_refused(tiny_engine_dir):
    """Two threads sharing one pipeline ran their denoising loops at once: on TensorRT (one set of
    buffers per engine, outputs that are views into them) the images would mix without an error.
    Calls now run one at a time, each giving the image it gives alone; a call from inside a call
    (its on_step) is refused, where it would overwrite the outer call's buffers."""
    import threading
    import time

    pipe = load_pipeline(tiny_engine_dir, "onnxruntime-cpu")
    unet = pipe.engines["unet"]
    inside, most = [0], [0]

    class Slow:  # the U-Net, slowed so that two unguarded loops would overlap
        def __init__(self, engine):
            self.engine = engine

        def __getattr__(self, name):
            return getattr(self.engine, name)

        def __call__(self, feed):
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            try:
                return self.engine(feed)
            finally:
                inside[0] -= 1

    pipe.engines["unet"] = Slow(unet)
    requests = [GenerationRequest(prompt=text, height=64, width=64, steps=4, seeds=[seed])
                for text, seed in (("a lighthouse", 1), ("a red fox", 2))]
    alone = [pipe(r).latents for r in requests]
    results: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: pipe(requests[i]).latents})) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert most[0] == 1
    assert all(torch.equal(results[i], alone[i]) for i in range(2))
    with pytest.raises(SdexportError, match=r"^a call of this pipeline inside another \(an on_step callback\?\)"):
        pipe(requests[0], on_step=lambda done, total: pipe(requests[1]))
    assert torch.equal(pipe(requests[0]).latents, alone[0])  # (the refusal left it usable)
    pipe.close()


def test_the_api_refuses_arguments_of_the_wrong_kind_in_one_line(tiny_engine_dir):
    """Each gave a raw AttributeError, TypeError or ValueError; split(-1) gave no part at all (a
    caller looping over the parts generated nothing)."""
    from sdexport.models.lora import LoraFile

    one = LoraFile.__new__(LoraFile)  # (a LoraFile without a file behind it: refused before it is read)
    object.__setattr__(one, "path", Path("x.safetensors"))
    object.__setattr__(one, "scale", 1.0)
    for loras, shown in ((["x.safetensors"], "str 'x.safetensors'"), ("x.safetensors", "str 'x.safetensors'"),
                         (one, "LoraFile")):
        with pytest.raises(SdexportError, match=f"^loras: expected (a list of )?LoraFile entries, got {shown}"):
            load_pipeline(tiny_engine_dir, "onnxruntime-cpu", loras=loras)
    request = GenerationRequest(prompt=["a", "b"], seeds=[0, 1], height=64, width=64)
    for size in (0, -1, 1.5, True):
        with pytest.raises(SdexportError, match=r"^split\(.*\): need a whole number of images per part, at least 1"):
            request.split(size)
    assert [part.prompt for part in request.split(1)] == [["a"], ["b"]]
    assert len(request.split(np.int64(1))) == 2  # (a numpy integer is a whole number)
    with pytest.raises(SdexportError, match="^prompt: expected a text or a list of texts, got int 5"):
        GenerationRequest(prompt=5)
    assert GenerationRequest(prompt=("a", "b")).batch == 2


def test_the_api_checks_requests_too(pipeline):
    for request, message in [
        (GenerationRequest(prompt=["x"], seeds=[-5], height=64, width=64), "^seeds -5: seeds are integers"),  # the API field
        (GenerationRequest(prompt=["x"], guidance=float("nan"), height=64, width=64), "guidance nan"),
        # one guidance per image: as many as images, each a number, all on one side of 1
        (GenerationRequest(prompt=["a", "b"], seeds=[0, 1], guidance=[7.0], height=64, width=64),
         "^guidance: 1 given for 2 images; give one, or one per image$"),
        (GenerationRequest(prompt=["a", "b"], seeds=[0, 1], guidance=[7.0, float("inf")], height=64, width=64),
         r"^guidance inf \(image 2 of 2\): need a finite number >= 0"),
        (GenerationRequest(prompt=["a", "b"], seeds=[0, 1], guidance=[7.0, 1.0], height=64, width=64),
         "^guidance 7, 1: a call guides all its images or none"),
        (GenerationRequest(prompt=["a", "b"], seeds=[0, 1], guidance=[-2.0, 7.0], height=64, width=64),
         r"^guidance -2.0 \(image 1 of 2\): need a finite number >= 0"),
        (GenerationRequest(prompt=["a", "b"], seeds=[0, 1], guidance=[7.0, True], height=64, width=64),
         r"^guidance True \(image 2 of 2\): expected an int or a float, not bool$"),
        (GenerationRequest(prompt=["x"], steps=999, scheduler="unipc", height=64, width=64), "outside the model's"),
        (GenerationRequest(prompt=["x"], steps=51, scheduler="lcm", height=64, width=64),
         r"^steps 51: the lcm scheduler takes at most 50 steps \(its original_inference_steps\)"),
        (GenerationRequest(prompt=[], seeds=[]), "no prompt given"),
        (GenerationRequest(prompt="a fox", seeds=5, height=64, width=64), r"^seeds 5: give a list of seeds, one per image$"),
        (GenerationRequest(prompt=["x"], steps=2.0, height=64, width=64), r"^steps 2.0 \(float\): need a whole number of steps"),
        # a number as text: said as such, not a TypeError from comparing it (the emphasis check reads cfg)
        (GenerationRequest(prompt=["x"], guidance="7", height=64, width=64), r"^guidance '7': expected an int or a float, not str, or a list of one per image$"),
        (GenerationRequest(prompt=["x"], height=np.int64(64), width=64), r"^height (np.int64\()?64\)? \(int64\): expected a whole number of pixels \(a Python int\)$"),
        (GenerationRequest(prompt=["x"], seeds=[np.int64(3)], height=64, width=64), r"^seeds (np.int64\()?3\)? \(int64\): seeds are Python integers"),
        # more images than the profile takes at once: the API says how to split them (the CLI splits)
        (GenerationRequest(prompt=["a", "b", "c"], seeds=[0, 1, 2], height=64, width=64),
         r"3 images in one call: the engines' profile takes at most 2; split the request \(request.split\(2\)"),
    ]:
        with pytest.raises(SdexportError, match=message):
            pipeline(request)
    # one text (or image) where a list may go, as diffusers takes them: not a list of one-letter prompts
    one = GenerationRequest(prompt="a fox", negative_prompt="blurry", image=Image.new("RGB", (64, 64)))
    assert (one.prompt, one.negative_prompt, len(one.image), one.batch) == (["a fox"], ["blurry"], 1, 1)
    edges = Image.new("RGB", (64, 64))
    single = GenerationRequest(prompt="a fox", control_image=edges, adapter_image=edges)  # the one ControlNet's, adapter's
    assert (single.control_image, single.adapter_image) == ([edges], [edges])
    assert single.control_images(0) == [edges]
    held = GenerationRequest(prompt="a fox", control_image=(edges, edges), adapter_image=(edges, edges))
    assert held.control_image == [edges, edges]  # one per ControlNet
    assert held.adapter_image == [(edges, edges)] and held.adapter_images(2) == [[edges], [edges]]  # one per adapter
    two = GenerationRequest(prompt=["a", "b"], negative_prompt="blurry", prompt_2="sharp", seeds=range(2))
    assert (two.negative_prompt, two.prompt_2, two.seeds) == (["blurry"] * 2, ["sharp"] * 2, [0, 1])
    request = GenerationRequest(prompt=["a", "b", "c"], seeds=[0, 1, 2], height=64, width=64, guidance=[3.0, 4.0, 5.0])
    assert [len(part.prompt) for part in request.split(2)] == [2, 1]
    assert [part.guidance for part in request.split(2)] == [[3.0, 4.0], [5.0]]
    held = GenerationRequest(prompt=("a", "b", "c"), seeds=[0, 1, 2], guidance=(3.0, 4.0, 5.0))  # tuples cut too
    assert [(part.prompt, part.guidance) for part in held.split(2)] == [(["a", "b"], [3.0, 4.0]), (["c"], [5.0])]
    for part in request.split(2):
        pipeline.check(part)


def test_blank_prompts_are_refused_by_run_and_accepted_by_the_api(pipeline):
    """run refuses a blank prompt (an unset variable, say); SDXL's second prompt may carry the text;
    the Python API generates unconditionally from one, as diffusers does."""
    from sdexport.runtime.request import check_prompt_text

    with pytest.raises(SdexportError, match="^the prompt is empty; give the text to generate from$"):
        check_prompt_text([" \n"])
    check_prompt_text(["", "x"], ["a castle", "y"])  # the second prompt carries it
    with pytest.raises(SdexportError, match="^prompt 2 of 2 is empty"):
        check_prompt_text(["x", ""], ["y", " "])
    assert pipeline(GenerationRequest(prompt=[""], steps=1, height=64, width=64)).images


def test_a_prompt_that_is_not_utf8_is_refused_before_the_engines_load(tiny_engine_dir, tmp_path, capsys, monkeypatch,
                                                                        pipeline):
    """A Latin-1 byte in the command line (Python's surrogate escape) or a lone surrogate from the
    API: one line naming it, where the tokenizer raised a TypeError after loading the engines."""
    from sdexport.runtime import loading

    monkeypatch.setattr(loading, "_load_engines", lambda *a, **k: pytest.fail("engines were loaded"))
    latin1 = os.fsdecode(b"caf\xe9")
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-n", latin1, "-o", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --negative-prompt: not UTF-8 text (the byte 0xe9 at character 4); give the text in UTF-8"
    with pytest.raises(SdexportError, match=r"^prompt: not UTF-8 text \(a lone surrogate U\+D800 at character 2\)"):
        pipeline(GenerationRequest(prompt=["a\ud800b"], steps=1, height=64, width=64))
    assert not (tmp_path / "x.png").exists()


def test_the_api_names_the_path_it_was_given_not_a_cli_flag(pipeline, tmp_path):
    result = pipeline(GenerationRequest(prompt=["x"], steps=1, height=64, width=64))
    with pytest.raises(SdexportError) as refused:
        result.save(tmp_path / "x.gif")
    assert str(refused.value) == f"{tmp_path / 'x.gif'}: sdexport writes .png, .jpg/.jpeg or .webp images, not .gif"
    (tmp_path / "mine.png").write_bytes(b"not sdexport's")
    with pytest.raises(SdexportError, match=r"^\S*mine.png: \S*mine.png exists and was not written by sdexport"):
        result.save(tmp_path / "mine.png")


@pytest.mark.parametrize("path", ["a file", "manifest.json"])
def test_a_file_given_as_engine_directory_is_called_a_file(tiny_engine_dir, tmp_path, capsys, path):
    given = tiny_engine_dir / "manifest.json" if path == "manifest.json" else tmp_path / "notes.txt"
    if not given.exists():  # the shared engine directory's manifest is left as it is
        given.touch()
    for command in (["run", given, "-p", "x", "-o", tmp_path / "x.png"], ["inspect", given]):
        assert run_cli(*command) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"{given} is a file, not an engine directory" in err and "no such" not in err
    assert ("(the folder that holds it is" in err) == (path == "manifest.json")


@pytest.mark.parametrize("inside", ["unet", "tokenizer", "unet/model.onnx"])
def test_a_path_inside_an_engine_directory_names_the_directory(tiny_engine_dir, tmp_path, capsys, monkeypatch, inside):
    """``inspect .`` in a component's folder was told the export did not finish."""
    monkeypatch.chdir(tiny_engine_dir / "unet")
    for given in (tiny_engine_dir / inside, Path("..") / inside):
        for command in (["run", given, "-p", "x", "-o", tmp_path / "x.png"], ["inspect", given]):
            assert run_cli(*command) == 2
            err = " ".join(capsys.readouterr().err.split())
            directory = tiny_engine_dir if given.is_absolute() else Path("..")
            assert (f"(it lies in the engine directory {directory})" if inside.endswith(".onnx") else
                    f"{given}: a folder inside the engine directory {directory}; give that directory") in err, err


def test_a_folder_under_another_tools_manifest_is_not_called_inside_an_engine_directory(tmp_path, capsys):
    """A web app's or a browser extension's manifest.json is not sdexport's."""
    (tmp_path / "manifest.json").write_text('{"name": "my app", "format": 2}')
    (tmp_path / "assets").mkdir()
    assert run_cli("inspect", tmp_path / "assets") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no manifest.json; not an sdexport engine directory" in err and "inside the engine directory" not in err


def test_an_image_is_never_written_into_an_engine_directory(tiny_engine_dir, no_engines, capsys):
    """One more file makes the directory no longer provably sdexport's (export --force, the builds)."""
    for inside in ("unet/x.png", "x.webp"):
        assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", tiny_engine_dir / inside) == 2
        assert "whose manifest lists every file in it; give a path outside it" in " ".join(capsys.readouterr().err.split())
        assert not (tiny_engine_dir / inside).exists()


@pytest.mark.parametrize("case", ["user file", "inside a file"])
def test_an_output_the_user_owns_is_never_overwritten(tiny_engine_dir, tmp_path, no_engines, capsys, case):
    mine = tmp_path / "photo.png"
    Image.new("RGB", (8, 8), "red").save(mine)
    before = mine.read_bytes()
    target = mine if case == "user file" else mine / "x.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", target) == 2
    err = capsys.readouterr().err
    expected = "exists and was not written by sdexport" if case == "user file" else "is a file, so no image"
    assert expected in " ".join(err.split()) and mine.read_bytes() == before


def test_a_file_name_too_long_for_the_temporary_name_is_refused_before_the_engines(tiny_engine_dir, tmp_path,
                                                                                    no_engines, capsys):
    """245 letters are a valid name, but not with ``.NAME.PID.tmp`` around it (nor ``-0`` in a batch)."""
    from sdexport.atomic import longest_name

    longest = longest_name(tmp_path)
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-o", tmp_path / ("a" * (longest - 3) + ".png")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"bytes; at most {longest} here); choose a shorter one" in err and ".tmp" not in err
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--batch", "2", "-o", tmp_path / ("a" * (longest - 5) + ".png")) == 2
    assert "-0.png' is too long" in capsys.readouterr().err  # a batch's names: NAME-0.png, NAME-1.png


def test_an_image_sdexport_wrote_is_replaced(tiny_engine_dir, tmp_path):
    out = tmp_path / "x.png"
    for seed in ("1", "2"):
        assert run_cli("run", tiny_engine_dir, "-p", "x", "--steps", "1", "--seed", seed, "-o", out) == 0
    assert json.loads(Image.open(out).text["sdexport"])["seed"] == 2


def test_a_truncated_prompt_is_announced_and_recorded(tiny_engine_dir, tmp_path, capsys):
    long = "a very long prompt " * 20  # the byte-level tiny tokenizer: one token per character
    out = tmp_path / "long.png"
    assert run_cli("run", tiny_engine_dir, "-p", long, "--steps", "1", "-o", out) == 0
    raw = capsys.readouterr().err
    err = " ".join(raw.split())
    assert ("warning: prompt 1 is longer than the 2 chunks of 75 tokens the engines read (export --prompt-chunks "
            "reads more); they read only:") in err
    params = json.loads(Image.open(out).text["sdexport"])
    # one line, however narrow the log: the quoted prompt can be copied as it is
    assert any(line.startswith("warning: prompt 1 is longer") and repr(params["prompt"]) in line
               for line in raw.splitlines())
    assert params["truncated_from"] == {"prompt": long}
    assert long.startswith(params["prompt"]) and 20 < len(params["prompt"]) < len(long)
    assert Image.open(out).text["parameters"].startswith(params["prompt"] + "\n")
    # one text for 6 images in 3 calls (the profile takes 2 at most): said once, naming the images, each recorded
    assert run_cli("run", tiny_engine_dir, "-p", long, "--batch", "6", "--steps", "1", "-o", out) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert err.count(" longer than ") == 1 and "warning: prompts 1-6 (the same text) are longer than" in err
    from sdexport.runtime.txt2img import spans

    assert spans([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7, 8" and spans([4]) == "4"
    assert all(json.loads(Image.open(tmp_path / f"long-{i}.png").text["sdexport"])["truncated_from"] == {"prompt": long}
               for i in range(6))


def test_a_prompt_cut_inside_a_character_records_whole_characters(pipeline):
    """Byte-level tokens cut é (two bytes) in two: the record keeps text that can be reused."""
    result = pipeline(GenerationRequest(prompt=["é" * 200], steps=1, height=64, width=64))
    [used] = result.truncated["prompt"]
    assert used and "\ufffd" not in used and ("é" * 200).startswith(used)


def test_a_short_prompt_is_recorded_as_given(pipeline):
    result = pipeline(GenerationRequest(prompt=["short"], steps=1, height=64, width=64))
    assert result.truncated == {}


def test_guidance_given_per_image_is_each_image_s_own(tiny_engine_dir, tmp_path):
    """``--guidance`` repeated, one per image: a guidance sweep in one call, each image recording its
    own (the loop's per-image guidance is checked bit for bit in tests/test_runtime.py)."""
    out = tmp_path / "x.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--batch", "2", "--guidance", "3", "--guidance", "6",
                   "--steps", "1", "-o", out) == 0
    records = [json.loads(Image.open(out.with_name(f"x-{i}.png")).text["sdexport"]) for i in range(2)]
    assert [record["guidance"] for record in records] == [3.0, 6.0]


def test_a_negative_prompt_without_guidance_is_said_to_be_ignored(tiny_engine_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-n", "blurry", "--guidance", "1", "--steps", "1", "-o", out) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "--negative-prompt ignored: --guidance 1 disables classifier-free guidance" in err
    image = Image.open(out)
    assert "negative_prompt" not in json.loads(image.text["sdexport"])  # not used: not recorded
    assert "Negative prompt" not in image.text["parameters"]


def test_the_largest_seed_runs(tiny_engine_dir, tmp_path):
    """2^64 - 1 is a seed (only past it is refused); the image records it."""
    out = tmp_path / "x.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--seed", str(2**64 - 1), "--steps", "1", "-o", out) == 0
    assert json.loads(Image.open(out).text["sdexport"])["seed"] == 2**64 - 1


def test_guidance_rescale_is_recorded_refused_out_of_range_and_said_ignored_without_guidance(tiny_engine_dir, tmp_path,
                                                                                           capsys):
    out = tmp_path / "x.png"
    assert run_cli("run", tiny_engine_dir, "-p", "x", "--guidance-rescale", "0.7", "--steps", "1", "-o", out) == 0
    assert json.loads(Image.open(out).text["sdexport"])["guidance_rescale"] == 0.7
    capsys.readouterr()
    for bad in ("1.5", "-0.1", "nan"):
        assert run_cli("run", tiny_engine_dir, "-p", "x", "--guidance-rescale", bad, "-o", out) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [(f"error: --guidance-rescale {float(bad)}: need a number from 0 (off) to 1 "
                                            "(0.7 is suggested for models trained for zero terminal SNR)")], err
    assert run_cli("run", tiny_engine_dir, "-p", "x", "-n", "y", "--guidance", "1", "--guidance-rescale", "0.7",
                   "--steps", "1", "-o", out) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert ("--negative-prompt and --guidance-rescale ignored: --guidance 1 disables classifier-free guidance, which "
            "is where the negatives and the rescale act") in err
    assert "guidance_rescale" not in json.loads(Image.open(out).text["sdexport"])


def test_nan_from_the_unet_is_not_blamed_on_the_vae(pipeline, monkeypatch):
    unet = pipeline.engines["unet"]

    def nan_unet(feed):
        return {"out_sample": torch.full_like(feed["sample"], float("nan"))}

    class Broken:
        spec, profile, device = unet.spec, unet.profile, unet.device
        __call__ = staticmethod(nan_unet)

    monkeypatch.setitem(pipeline.engines, "unet", Broken())
    with pytest.raises(SdexportError) as caught:
        pipeline(GenerationRequest(prompt=["x"], steps=2, height=64, width=64))
    message = str(caught.value)
    assert "denoising loop produced NaN/Inf latents" in message and "VAE decoder" not in message
    # an fp32 export's U-Net (a NaN LoRA, say) is not blamed on fp16
    assert pipeline.info.get("dtype") == "fp32" and "fp16" not in message and "computes in fp32" in message


def test_sdxl_size_conditioning_is_bounded():
    from sdexport.models.presets import PRESETS
    from sdexport.runtime.request import check_request
    from sdexport.specs import ModelDims

    dims = ModelDims(S=77, E=64, P=32, C=4, vae_scale_factor=8, unet_downsample=2, E1=32, E2=32, T=6)
    for field in ("original_size", "target_size", "crops_coords_top_left"):
        request = GenerationRequest(prompt=["x"], height=64, width=64, **{field: (99999999999999999999, 1)})
        with pytest.raises(SdexportError, match=f"{field} .*pixel counts from 0 to 65536"):
            check_request(request, family="sdxl", dims=dims, profile=PRESETS["tiny-sdxl"].profile)


def test_the_api_refuses_more_seeds_than_images(pipeline):
    """One seed per image: a second seed for one prompt was taken and never used (the image was the
    first seed's), where diffusers refuses a generator list longer than the batch."""
    with pytest.raises(SdexportError, match=r"^seeds: 2 for 1 images; give one per image"):
        pipeline(GenerationRequest(prompt=["x"], seeds=[3, 4], height=64, width=64))


# From mutation testing round 5: each seen to fail with the change it guards against.

def test_a_bool_is_not_a_seed(pipeline):
    """``True`` is an int to Python; a seed given as one is refused, not run as seed 1."""
    with pytest.raises(SdexportError, match=r"^seeds True: seeds are integers from 0"):
        pipeline.check(GenerationRequest(prompt=["x"], seeds=[True], height=64, width=64))


def test_negative_prompts_must_be_one_per_prompt(pipeline):
    """A list of negatives of another length than the prompts is refused in one line, before any
    engine runs (the text encoder would read three texts for a CFG batch of four)."""
    with pytest.raises(SdexportError, match=r"^1 negative prompts for 2 prompts; give one per prompt"):
        pipeline.check(GenerationRequest(prompt=["a", "b"], seeds=[0, 1], negative_prompt=["n"], height=64, width=64))


def test_a_request_from_a_base_models_latents_takes_their_size():
    """No height or width given: a refiner's request is the size of the latents it starts from
    (their sides times the VAE's factor), not the profile's opt."""
    request = GenerationRequest(prompt=["x"], denoising_start=0.5, init_latents=torch.zeros(1, 4, 12, 8))
    assert request.sized((64, 64), 8).size == (96, 64)
    assert GenerationRequest(prompt=["x"]).sized((64, 80), 8).size == (64, 80)


def test_the_edges_of_the_ranges_are_taken(pipeline):
    """The bounds the refusals name are inside the ranges: guidance 0 (SDXL-Turbo's,
    no guidance), guidance_rescale 1, and as many steps as the model's training timesteps (with a
    scheduler that takes them: DPM++ 2M Karras)."""
    for request in (GenerationRequest(prompt=["x"], guidance=0.0, height=64, width=64),
                    GenerationRequest(prompt=["x"], guidance=[0.0], height=64, width=64),
                    GenerationRequest(prompt=["x"], guidance_rescale=1.0, height=64, width=64),
                    GenerationRequest(prompt=["x"], steps=1000, scheduler="dpmpp_2m_karras", height=64, width=64)):
        pipeline.check(request)


# From mutation testing round 5 (saved images): each seen to fail with the change it guards against.

def test_a_batch_written_to_a_name_without_a_suffix_gets_png_names():
    """``-o out`` for several images writes out-0.png, out-1.png (PNG, as one image's ``out``)."""
    from pathlib import Path

    from sdexport.runtime.images import output_paths

    assert output_paths(Path("out"), 2) == [Path("out-0.png"), Path("out-1.png")]
    assert output_paths(Path("out.jpg"), 2) == [Path("out-0.jpg"), Path("out-1.jpg")]


def test_the_longest_name_allowed_is_taken_and_one_byte_more_is_not(tmp_path):
    """The limit ``check_image_output`` names is the longest name it takes."""
    from sdexport.atomic import longest_name
    from sdexport.runtime.images import check_image_output

    longest = longest_name(tmp_path)
    check_image_output(tmp_path / ("a" * (longest - 4) + ".png"), 1)
    with pytest.raises(SdexportError, match=f"is too long \\({longest + 1} bytes; at most {longest} here\\)"):
        check_image_output(tmp_path / ("a" * (longest - 3) + ".png"), 1)


def test_an_a1111_png_or_a_jpeg_tagged_sdexport_without_its_record_is_not_replaced(tmp_path):
    """An image is sdexport's only with sdexport's record: not an A1111 PNG (its own
    ``parameters`` text), nor a JPEG whose Software tag says sdexport but whose description is the
    user's (edited since)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from sdexport.runtime.images import check_image_output

    a1111 = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", "a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=info)
    edited = tmp_path / "edited.jpg"
    exif = Image.Exif()
    exif[0x0131] = "sdexport 1.0"
    exif[0x010E] = "my holiday photo"
    Image.new("RGB", (8, 8)).save(edited, exif=exif)
    for path in (a1111, edited):
        with pytest.raises(SdexportError, match="exists and was not written by sdexport"):
            check_image_output(path, 1)


def test_the_a1111_text_gives_the_size_as_width_x_height():
    """A1111's "Size:" is width x height (its PNG Info sends it back so): a 64-high, 96-wide
    image says 96x64."""
    from PIL import Image

    from sdexport.runtime.images import image_parameters
    from sdexport.runtime.txt2img import GenerationResult, Timings

    request = GenerationRequest(prompt=["x"], height=64, width=96, guidance=7.5, steps=2)
    result = GenerationResult(images=[Image.new("RGB", (96, 64))], latents=torch.zeros(1), pixels=np.zeros((1, 64, 96, 3)),
                              timings=Timings(), request=request, family="sd", scheduler="pndm", sampler="PLMS")
    text, record = image_parameters(result, 0, {})
    assert "Size: 96x64" in text and (record["height"], record["width"]) == (64, 96)
