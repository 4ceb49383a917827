"""The Python API as the README documents it, for a user's type checker (never run: type-checked by
tests/test_python_api_types.py with ``mypy --strict``, as a user's own code importing the installed,
typed package would be). Before sdexport shipped ``py.typed`` its types were no one's; with it, the
fields' normalised types refused the README's own forms (one text for a list, a range of seeds, one
image, a LoRA path as text)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdexport.console import QUIET, set_verbosity
from sdexport.models.lora import LoraFile
from sdexport.runtime.loading import load_pipeline
from sdexport.runtime.request import MASKED_INIT
from sdexport.runtime.txt2img import GenerationRequest, GenerationResult


def readme_forms(engines: Path, picture: Image.Image, mask: Image.Image) -> list[Path]:
    set_verbosity(QUIET)
    written: list[Path] = []
    scales: list[float] = [1.0, 0.5]
    with load_pipeline(engines, "onnxruntime", image_inputs=True,
                       loras=[LoraFile("out/tiny-lora.safetensors", 0.8)]) as pipe:
        result: GenerationResult = pipe(GenerationRequest(prompt=["a lighthouse"], steps=20, seeds=[1], height=128,
                                                          width=128))
        written += result.save("lighthouse.png")
        print(result.timings.to_dict())
        request = GenerationRequest(prompt="a lighthouse", negative_prompt="blurry", seeds=range(4),
                                    image=picture, mask=mask, strength=0.75, guidance=(5.0, 7.5, 9.0, 9.0))
        for part in request.split(2):
            pipe(part, on_step=lambda done, total: done == total)
        pipe(GenerationRequest(prompt=("a", "b"), seeds=(0, 1), control_image=[[picture, picture], MASKED_INIT],
                               control_scale=[scales, 0.8], control_start=0.1, adapter_scale=scales,
                               prompt_2="b", negative_prompt_2="c", original_size=(1024, 1024)))
    pipe = load_pipeline(str(engines), "torch")
    pipe.close(timeout=5)
    return written
