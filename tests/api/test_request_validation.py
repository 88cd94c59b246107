"""Every input the API would refuse is refused locally, naming the field, the value and what is allowed."""

from __future__ import annotations

import base64
import io
import logging
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from airflow_provider_jimeng.api.capabilities import MAX_REFERENCE_IMAGE_BYTES
from airflow_provider_jimeng.api.reference_images import ImageInput
from airflow_provider_jimeng.api.request import (
    MissingParameterError,
    build_request_body,
    max_images_billed,
    validate_body,
)
from airflow_provider_jimeng.exceptions import JiMengConfigurationError

MODEL_4_0 = "doubao-seedream-4-0-250828"
MODEL_4_5 = "doubao-seedream-4-5-251128"
MODEL_3_0 = "doubao-seedream-3-0-t2i-250415"
MODEL_5_0 = "doubao-seedream-5-0-260128"
URL = "https://example.com/reference.png"


def image_bytes(image_format: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    """A small real image in ``image_format`` (a Pillow format name: PNG, JPEG, WEBP...)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buffer, format=image_format)
    return buffer.getvalue()


PNG_B64 = base64.b64encode(image_bytes("PNG")).decode()


def _build(**kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("model", MODEL_4_0)
    prompt = kwargs.pop("prompt", "a red fox in the snow")
    return build_request_body(prompt, **kwargs)


def _assert_refused(error: JiMengConfigurationError, parameter: str, fragments: tuple[str, ...]) -> None:
    assert error.parameter == parameter
    message = str(error)
    assert message.startswith(f"{parameter}: ")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# (keyword arguments of build_request_body, parameter named, fragments the message must contain)
BAD_ARGUMENTS = [
    pytest.param({"prompt": ""}, "prompt", ("non-empty string", "empty"), id="empty-prompt"),
    pytest.param({"prompt": " \n\t "}, "prompt", ("non-empty string", "whitespace"), id="whitespace-prompt"),
    pytest.param({"prompt": 42}, "prompt", ("non-empty string", "int"), id="int-prompt"),
    pytest.param({"prompt": None}, "prompt", ("NoneType",), id="none-prompt"),
    pytest.param({"size": "3K"}, "size", ("'3K'", "Seedream 4.0", "'1K' / '2K' / '4K'"), id="size-3K"),
    pytest.param({"size": "100x100"}, "size", ("'100x100'", "10000 is below 921600", "W*H >= 921600"), id="size-tiny"),
    pytest.param({"size": "5000x100"}, "size", ("'5000x100'", "aspect ratio 5000/100"), id="size-5000x100"),
    pytest.param(
        {"size": "4096x200"}, "size", ("'4096x200'", "aspect ratio 4096/200 is outside [1/16, 16]"), id="ratio-over-16"
    ),
    pytest.param({"size": "400x8000"}, "size", ("'400x8000'", "aspect ratio 400/8000"), id="ratio-under-1/16"),
    pytest.param({"size": "4097x4097"}, "size", ("'4097x4097'", "is above 16777216"), id="size-over-4K"),
    pytest.param({"size": "0x1024"}, "size", ("'0x1024'", "sides must be positive"), id="size-zero-side"),
    pytest.param({"size": "big"}, "size", ("'big'", "'WxH'"), id="size-not-a-size"),
    pytest.param({"size": 2048}, "size", ("must be a string", "int"), id="size-int"),
    pytest.param({"model": MODEL_4_5, "size": "1K"}, "size", ("'1K'", "Seedream 4.5", "'2K' / '4K'"), id="1K-on-4.5"),
    pytest.param(
        {"model": MODEL_4_5, "size": "1024x1024"}, "size", ("'1024x1024'", "below 3686400"), id="small-WxH-on-4.5"
    ),
    pytest.param(
        {"model": MODEL_3_0, "size": "500x500"},
        "size",
        ("'500x500'", "W*H = 250000 is below 262144", "W*H >= 262144, W*H <= 4194304"),
        id="3.0-below-512x512-pixels",
    ),
    pytest.param(
        {"model": MODEL_3_0, "size": "2049x2048"},
        "size",
        ("'2049x2048'", "is above 4194304"),
        id="3.0-over-2048x2048-pixels",
    ),
    pytest.param(
        {"model": MODEL_3_0, "size": "1K"},
        "size",
        ("'1K'", "Seedream 3.0", "'WxH' with W*H >= 262144"),
        id="keyword-on-3.0",
    ),
    pytest.param({"model": MODEL_5_0, "size": "4K"}, "size", ("'4K'", "Seedream 5.0", "'2K' / '3K'"), id="4K-on-5.0"),
    pytest.param(
        {"model": MODEL_5_0, "size": "1500x1500"}, "size", ("'1500x1500'", "below 3686400"), id="small-WxH-on-5.0"
    ),
    pytest.param(
        {"model": MODEL_5_0, "size": "3300x3300"}, "size", ("'3300x3300'", "above 10404496"), id="big-WxH-on-5.0"
    ),
    pytest.param(
        {"output_format": "png"},
        "output_format",
        ("'png'", "not supported by Seedream 4.0", "jpeg only"),
        id="png-on-4.0",
    ),
    pytest.param(
        {"model": MODEL_5_0, "output_format": "webp"}, "output_format", ("'webp'", "'jpeg' or 'png'"), id="webp"
    ),
    pytest.param(
        {"model": MODEL_4_5, "web_search": True},
        "web_search",
        ("not supported by Seedream 4.5", "Seedream 5.0 only"),
        id="web-search-on-4.5",
    ),
    pytest.param(
        {"model": MODEL_3_0, "seed": -2}, "seed", ("-2", "an integer in [-1, 2147483647]"), id="seed-below-minus-1"
    ),
    pytest.param({"model": MODEL_3_0, "seed": 2**31}, "seed", ("2147483648", "[-1, 2147483647]"), id="seed-over-int32"),
    pytest.param({"model": MODEL_3_0, "seed": True}, "seed", ("True", "an integer"), id="seed-bool"),
    pytest.param({"model": MODEL_3_0, "seed": "7"}, "seed", ("'7'", "an integer"), id="seed-str"),
    pytest.param({"response_format": "png"}, "response_format", ("'png'", "'url' or 'b64_json'"), id="format-png"),
    pytest.param({"watermark": "yes"}, "watermark", ("'yes'", "true or false"), id="watermark-str"),
    pytest.param(
        {"sequential_image_generation": "auto", "max_images": 0}, "max_images", ("0", "[1, 15]"), id="max-images-0"
    ),
    pytest.param(
        {"sequential_image_generation": "auto", "max_images": 16}, "max_images", ("16", "[1, 15]"), id="max-images-16"
    ),
    pytest.param(
        {"sequential_image_generation": "auto", "max_images": 2.0},
        "max_images",
        ("2.0", "integer"),
        id="max-images-float",
    ),
    pytest.param(
        {"max_images": 4}, "max_images", ("sequential_image_generation='auto'",), id="max-images-without-auto"
    ),
    pytest.param(
        {"sequential_image_generation": "disabled", "max_images": 4},
        "max_images",
        ("sequential_image_generation='auto'",),
        id="max-images-with-disabled",
    ),
    pytest.param(
        {"sequential_image_generation": "sometimes"},
        "sequential_image_generation",
        ("'sometimes'", "'auto' or 'disabled'"),
        id="sequential-unknown",
    ),
    pytest.param(
        {"model": MODEL_3_0, "sequential_image_generation": "auto"},
        "sequential_image_generation",
        ("'auto'", "not supported by Seedream 3.0"),
        id="sequential-on-3.0",
    ),
    pytest.param({"model": MODEL_3_0, "stream": True}, "stream", ("streaming", "Seedream 3.0"), id="stream-on-3.0"),
    pytest.param({"image": [URL] * 15}, "image", ("15 reference images", "at most 14"), id="15-refs-on-4.0"),
    pytest.param(
        {"model": MODEL_5_0, "image": [URL] * 15}, "image", ("15 reference images", "at most 14"), id="15-refs-on-5.0"
    ),
    pytest.param(
        {"model": MODEL_4_5, "image": [URL] * 15}, "image", ("15 reference images", "at most 14"), id="15-refs-on-4.5"
    ),
    pytest.param({"model": MODEL_3_0, "image": URL}, "image", ("not supported by Seedream 3.0",), id="refs-on-3.0"),
    pytest.param(
        {"model": MODEL_4_5, "optimize_prompt_mode": "fast"},
        "optimize_prompt_mode",
        ("'fast'", "Seedream 4.5", "allowed: 'standard'"),
        id="fast-on-4.5",
    ),
    pytest.param(
        {"optimize_prompt_mode": "turbo"},
        "optimize_prompt_mode",
        ("'turbo'", "'standard' or 'fast'"),
        id="unknown-optimize-mode",
    ),
    pytest.param(
        {"model": MODEL_3_0, "optimize_prompt_mode": "standard"},
        "optimize_prompt_mode",
        ("not supported by Seedream 3.0",),
        id="optimize-on-3.0",
    ),
    pytest.param(
        {"guidance_scale": 5.0},
        "guidance_scale",
        ("not supported by Seedream 4.0", "Seedream 3.0 only"),
        id="guidance-4.0",
    ),
    pytest.param(
        {"model": MODEL_3_0, "guidance_scale": 11},
        "guidance_scale",
        ("11", "a number in [1, 10]"),
        id="guidance-over-10",
    ),
    pytest.param(
        {"extra_body": {"size": "2K"}}, "extra_body", ("sets size", "named parameters"), id="extra-body-clashes-size"
    ),
    pytest.param(
        {"extra_body": {"n": 2, "watermark": False, "seed": 1}},
        "extra_body",
        ("seed, watermark",),
        id="extra-body-clashes-several",
    ),
]


@pytest.mark.parametrize(("kwargs", "parameter", "fragments"), BAD_ARGUMENTS)
def test_invalid_argument_is_refused_naming_field_value_and_rule(
    kwargs: dict[str, Any], parameter: str, fragments: tuple[str, ...]
) -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        _build(**kwargs)
    _assert_refused(caught.value, parameter, fragments)


def png_header(width: int, height: int) -> bytes:
    """The first bytes of a PNG of any size: the checks read dimensions from the header only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def _missing_file(tmp_path: Path) -> ImageInput:
    return str(tmp_path / "nope.png")


def _text_file(tmp_path: Path) -> ImageInput:
    path = tmp_path / "notes.png"
    path.write_text("these are not pixels\n")
    return path


def _oversized_file(tmp_path: Path) -> ImageInput:
    path = tmp_path / "huge.jpeg"
    with path.open("wb") as handle:
        handle.truncate(MAX_REFERENCE_IMAGE_BYTES + 1)  # sparse: refused from its size alone
    return path


BAD_REFERENCE_IMAGES: list[Any] = [
    pytest.param(_missing_file, ("does not exist", "nope.png"), id="missing-file"),
    pytest.param(_text_file, ("is not an image", "allowed formats: jpeg, png"), id="text-file"),
    pytest.param(_oversized_file, ("huge.jpeg", "10485761 bytes", "at most 10485760 bytes"), id="file-over-10MB"),
    pytest.param(
        lambda _: b"\xff\xd8" + bytes(MAX_REFERENCE_IMAGE_BYTES), ("10485762 bytes", "at most"), id="bytes-over-10MB"
    ),
    pytest.param(
        lambda _: f"data:image/PNG;base64,{PNG_B64}",
        ("'image/PNG'", "must be lower case", "image/png"),
        id="data-uri-upper-case",
    ),
    pytest.param(
        lambda _: f"data:image/xyz;base64,{PNG_B64}",
        ("'image/xyz'", "allowed: image/jpeg"),
        id="data-uri-unknown-format",
    ),
    pytest.param(lambda _: "data:image/png;base64,%%%not-base64%%%", ("does not decode",), id="data-uri-not-base64"),
    pytest.param(lambda _: "data:text/plain,hello", ("data:image/<format>;base64",), id="data-uri-not-image"),
    pytest.param(
        lambda _: "data:image/png;base64," + base64.b64encode(image_bytes("JPEG")).decode(),
        ("declares image/png but holds jpeg",),
        id="data-uri-format-mismatch",
    ),
    pytest.param(lambda _: image_bytes("PNG", (10, 10)), ("10x10", "> 14 px"), id="image-10x10"),
    pytest.param(lambda _: image_bytes("PNG", (20, 400)), ("20x400", "aspect ratio", "[1/16, 16]"), id="image-1-to-20"),
    pytest.param(
        lambda _: png_header(6001, 6000), ("6001x6000 = 36006000 pixels", "at most 36000000"), id="image-over-36MP"
    ),
    pytest.param(lambda _: b"\xff\xd8", ("jpeg data whose dimensions cannot be read",), id="two-byte-jpeg"),
    pytest.param(lambda _: b"II*\x00", ("tiff data whose dimensions cannot be read",), id="bare-tiff-header"),
    pytest.param(
        lambda _: b"II*\x00\x08\x00\x00\x00\x00\x00",
        ("tiff data whose dimensions cannot be read",),
        id="tiff-without-dimensions",
    ),
    pytest.param(lambda _: b"\x89PNG\r\n\x1a\n", ("png data whose dimensions cannot be read",), id="png-signature"),
    pytest.param(lambda _: b"GIF89a\x01", ("gif data whose dimensions cannot be read",), id="truncated-gif"),
    pytest.param(lambda _: b"RIFF\x00\x00\x00\x00WEBP", ("webp data whose dimensions",), id="truncated-webp"),
    pytest.param(lambda _: "ftp://example.com/x.png", ("'ftp'", "not allowed"), id="ftp-url"),
    pytest.param(lambda _: "   ", ("is empty",), id="blank-string"),
    pytest.param(lambda _: 42, ("got int",), id="int"),
]


@pytest.mark.parametrize(("make_input", "fragments"), BAD_REFERENCE_IMAGES)
def test_invalid_reference_image_is_refused_before_sending(
    tmp_path: Path, make_input: Callable[[Path], Any], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        _build(image=make_input(tmp_path))
    _assert_refused(caught.value, "image", fragments)


def test_invalid_reference_image_in_a_list_is_named_by_position(tmp_path: Path) -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        _build(image=[URL, image_bytes("PNG"), _missing_file(tmp_path)])
    _assert_refused(caught.value, "image[2]", ("does not exist",))


@pytest.mark.parametrize(
    ("body", "parameter", "fragments"),
    [
        pytest.param({"model": " ", "prompt": "x"}, "model", ("is required",), id="blank-model"),
        pytest.param(
            {"model": MODEL_4_0, "prompt": "x", "image": ["s3://bucket/key.png"]},
            "image[0]",
            ("http(s) URL",),
            id="image-not-url",
        ),
        pytest.param(
            {"model": MODEL_4_0, "prompt": "x", "image": [1, 2]}, "image", ("URL or data URI",), id="image-not-strings"
        ),
        pytest.param(
            {"model": MODEL_4_0, "prompt": "x", "stream": "yes"}, "stream", ("true or false", "'yes'"), id="stream-str"
        ),
        pytest.param(
            {"model": MODEL_4_0, "prompt": "x", "sequential_image_generation_options": [4]},
            "sequential_image_generation_options",
            ("must be an object",),
            id="options-not-object",
        ),
    ],
)
def test_validate_body_refuses_a_bad_raw_body(body: dict[str, Any], parameter: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        validate_body(body)
    _assert_refused(caught.value, parameter, fragments)


@pytest.mark.parametrize(
    ("model", "size"),
    [
        (MODEL_4_0, "1K"),
        (MODEL_4_0, "2K"),
        (MODEL_4_0, "4K"),
        (MODEL_4_0, "2048x2048"),
        (MODEL_4_0, "1280x720"),
        (MODEL_4_0, "720x1280"),
        (MODEL_4_0, "6240x2656"),
        (MODEL_4_0, "3840x240"),  # exactly 16:1
        ("seedream-4-0-250828", "2K"),
        (MODEL_4_5, "2K"),
        (MODEL_4_5, "4K"),
        (MODEL_4_5, "2048x2048"),
        (MODEL_4_5, "2560x1440"),
        (MODEL_3_0, "512x512"),
        (MODEL_3_0, "2048x2048"),
        (MODEL_3_0, "1024x768"),
        (MODEL_3_0, "2560x1440"),  # 3,686,400 pixels: the bound is on W*H, not on each side
        (MODEL_3_0, "4096x1024"),
        (MODEL_5_0, "2K"),
        (MODEL_5_0, "3K"),
        (MODEL_5_0, "3750x1250"),  # the documentation's valid example
        (MODEL_5_0, "3072x3072"),
        ("seedream-5-0-260128", "3K"),
        ("doubao-seedream-5-0-lite-260128", "3K"),
    ],
)
def test_valid_size_is_accepted_for_its_family(model: str, size: str) -> None:
    body = _build(model=model, size=size)
    assert body["size"] == size
    assert validate_body(body).name.startswith("Seedream")


@pytest.mark.parametrize(
    ("written", "sent"),
    [("2048×2048", "2048x2048"), ("2560*1440", "2560x1440"), (" 1280 X 720 ", "1280x720"), ("2k", "2K")],
)
def test_sizes_are_sent_as_the_documentation_writes_them(written: str, sent: str) -> None:
    assert _build(size=written)["size"] == sent


@pytest.mark.parametrize(
    ("body", "parameter"),
    [({"prompt": "x"}, "model"), ({"model": MODEL_4_0}, "prompt"), ({"model": MODEL_4_0, "prompt": None}, "prompt")],
)
def test_a_missing_required_field_is_missing_not_invalid(body: dict[str, Any], parameter: str) -> None:
    with pytest.raises(MissingParameterError) as caught:
        validate_body(body)
    _assert_refused(caught.value, parameter, ("is required",))


def test_an_empty_prompt_is_invalid_not_missing() -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        validate_body({"model": MODEL_4_0, "prompt": ""})
    assert not isinstance(caught.value, MissingParameterError)


def test_reference_images_cap_a_set_but_do_not_refuse_max_images() -> None:
    # "输入的参考图数量+最终生成的图片数量≤15张" caps what is generated; max_images stays in [1, 15].
    body = _build(sequential_image_generation="auto", max_images=14, image=[URL, URL])
    assert body["sequential_image_generation_options"] == {"max_images": 14}
    assert max_images_billed(body) == 13
    assert max_images_billed(_build(sequential_image_generation="auto", max_images=4, image=[URL] * 14)) == 1


def test_seedream_5_fields_land_in_the_body() -> None:
    body = _build(model=MODEL_5_0, size="3K", output_format="png", web_search=True)
    assert body["output_format"] == "png"
    assert body["tools"] == [{"type": "web_search"}]
    assert validate_body(body).name == "Seedream 5.0 lite"
    plain = _build(model=MODEL_5_0)
    assert "tools" not in plain
    assert "output_format" not in plain


def test_jpeg_is_accepted_for_every_family() -> None:
    # Every family produces JPEG: asking for it explicitly is harmless; only PNG is 5.0's.
    assert _build(output_format="jpeg")["output_format"] == "jpeg"
    assert _build(model=MODEL_3_0, output_format="jpeg")["output_format"] == "jpeg"


@pytest.mark.parametrize(
    "tools", [[{"type": "code_interpreter"}], {"type": "web_search"}, ["web_search"]], ids=["unknown", "dict", "str"]
)
def test_malformed_tools_are_refused(tools: Any) -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        validate_body({"model": MODEL_5_0, "prompt": "x", "tools": tools})
    _assert_refused(caught.value, "tools", ("[{'type': 'web_search'}]",))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda: png_header(7000, 3000), "png", id="7000x3000-is-21MP"),
        pytest.param(lambda: png_header(6000, 6000), "png", id="6000x6000"),
        pytest.param(lambda: png_header(16, 256), "png", id="exactly-1-to-16"),
        pytest.param(lambda: image_bytes("TIFF", (40, 30)), "tiff", id="tiff"),
        pytest.param(lambda: image_bytes("JPEG", (40, 30)), "jpeg", id="jpeg"),
    ],
)
def test_reference_images_are_limited_by_pixels_and_ratio_not_sides(make: Callable[[], bytes], expected: str) -> None:
    assert _build(image=make())["image"].startswith(f"data:image/{expected};base64,")


@pytest.mark.parametrize(
    "model",
    [
        "ep-20240101123456-abcde",
        "ep-m-20250101-xyz",
        "my-fine-tuned-image-model",
        "doubao-seedream-9-0-300101",
        "doubao-seedream-5-0-pro-260628",  # its rules are not those of 5.0 lite
    ],
)
def test_endpoint_ids_and_unknown_models_are_accepted_permissively(model: str) -> None:
    body = _build(
        model=model,
        size="4096x200",
        sequential_image_generation="auto",
        max_images=3,
        stream=True,
        guidance_scale=5,
        optimize_prompt_mode="fast",
        image=[URL] * 12,
    )
    assert validate_body(body).name == "unrecognised model or endpoint id"
    assert body["model"] == model


def test_endpoint_ids_still_get_shape_checks() -> None:
    with pytest.raises(JiMengConfigurationError) as caught:
        _build(model="ep-20240101123456-abcde", size="5K", seed=-5)
    _assert_refused(caught.value, "size", ("'5K'",))


def test_english_prompt_over_600_words_warns_but_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="airflow_provider_jimeng")
    prompt = " ".join(["fox"] * 601)
    body = _build(prompt=prompt)
    assert body["prompt"] == prompt
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "601 words" in warnings[0].getMessage()
    assert "longer than recommended" in warnings[0].getMessage()


def test_chinese_prompt_over_300_characters_warns_but_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="airflow_provider_jimeng")
    body = _build(prompt="雪" * 301)
    assert len(body["prompt"]) == 301
    assert "301 Chinese characters" in caplog.text


def test_prompt_within_recommended_length_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="airflow_provider_jimeng")
    _build(prompt=" ".join(["fox"] * 600))
    _build(prompt="雪" * 300)
    assert not caplog.records


def test_png_bytes_become_a_png_data_uri() -> None:
    png = image_bytes("PNG")
    body = _build(image=png)
    assert body["image"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert base64.b64decode(body["image"].split(",", 1)[1]) == png


def test_bytearray_is_accepted_like_bytes() -> None:
    png = image_bytes("PNG")
    assert _build(image=bytearray(png))["image"] == _build(image=png)["image"]


@pytest.mark.parametrize("as_str", [False, True], ids=["pathlib.Path", "str-path"])
def test_jpeg_file_path_becomes_a_jpeg_data_uri(tmp_path: Path, as_str: bool) -> None:
    jpeg = image_bytes("JPEG", (40, 30))
    path = tmp_path / "reference.jpg"
    path.write_bytes(jpeg)
    body = _build(image=str(path) if as_str else path)
    assert body["image"] == "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


@pytest.mark.parametrize("image_format", ["WEBP", "GIF", "BMP"])
def test_newer_reference_formats_are_sniffed(image_format: str) -> None:
    body = _build(image=image_bytes(image_format))
    assert body["image"].startswith(f"data:image/{image_format.lower()};base64,")


def test_https_url_and_valid_data_uri_pass_through_unchanged() -> None:
    data_uri = f"data:image/png;base64,{PNG_B64}"
    assert _build(image=URL)["image"] == URL
    assert _build(image=data_uri)["image"] == data_uri


def test_list_of_mixed_inputs_keeps_order(tmp_path: Path) -> None:
    jpeg_path = tmp_path / "a.jpeg"
    jpeg_path.write_bytes(image_bytes("JPEG"))
    body = _build(image=[URL, image_bytes("PNG"), jpeg_path])
    assert isinstance(body["image"], list)
    assert body["image"][0] == URL
    assert body["image"][1].startswith("data:image/png;base64,")
    assert body["image"][2].startswith("data:image/jpeg;base64,")


def test_empty_image_list_sends_no_image_field() -> None:
    assert "image" not in _build(image=[])


def test_auto_without_max_images_sends_15_minus_reference_images() -> None:
    alone = _build(sequential_image_generation="auto")
    with_refs = _build(sequential_image_generation="auto", image=[URL, URL, URL])
    assert alone["sequential_image_generation_options"] == {"max_images": 15}
    assert with_refs["sequential_image_generation_options"] == {"max_images": 12}
    assert max_images_billed(with_refs) == 12


def test_auto_with_max_images_sends_it_and_bills_at_most_that() -> None:
    body = _build(sequential_image_generation="auto", max_images=4)
    assert body["sequential_image_generation"] == "auto"
    assert body["sequential_image_generation_options"] == {"max_images": 4}
    assert max_images_billed(body) == 4


def test_single_image_request_bills_one_and_sends_no_set_options() -> None:
    body = _build(sequential_image_generation="disabled")
    assert "sequential_image_generation_options" not in body
    assert max_images_billed(body) == 1


@pytest.mark.parametrize("watermark", [True, False])
def test_watermark_and_response_format_are_always_explicit(watermark: bool) -> None:
    body = _build(watermark=watermark)
    assert body["watermark"] is watermark
    assert body["response_format"] == "url"
    assert "stream" not in body


def test_all_named_parameters_land_in_the_body() -> None:
    body = _build(
        size="2048x2048",
        response_format="b64_json",
        watermark=False,
        sequential_image_generation="auto",
        max_images=2,
        optimize_prompt_mode="fast",
        stream=True,
        extra_body={"n": 1, "user": "dag-42"},
    )
    assert body == {
        "model": MODEL_4_0,
        "prompt": "a red fox in the snow",
        "size": "2048x2048",
        "sequential_image_generation": "auto",
        "sequential_image_generation_options": {"max_images": 2},
        "response_format": "b64_json",
        "watermark": False,
        "stream": True,
        "optimize_prompt_options": {"mode": "fast"},
        "n": 1,
        "user": "dag-42",
    }


def test_seed_bounds_are_inclusive() -> None:
    assert _build(model=MODEL_3_0, seed=-1)["seed"] == -1
    assert _build(model=MODEL_3_0, seed=2**31 - 1)["seed"] == 2**31 - 1


@pytest.mark.parametrize("model", [MODEL_4_0, MODEL_4_5, MODEL_5_0])
def test_seed_is_refused_where_the_api_does_not_document_it(model: str) -> None:
    """Regression: ``seed`` was sent to every family; the API documents it for 3.0 t2i and SeedEdit only."""
    with pytest.raises(JiMengConfigurationError) as caught:
        _build(model=model, seed=7)
    _assert_refused(caught.value, "seed", ("is not a parameter of Seedream", "Seedream 3.0 text-to-image"))


def test_optimize_prompt_thinking_is_sent_as_the_sdk_knows_it() -> None:
    """Regression: ``optimize_prompt_options.thinking`` (official SDK) could not be sent at all."""
    assert _build(optimize_prompt_thinking="enabled")["optimize_prompt_options"] == {"thinking": "enabled"}
    body = _build(model=MODEL_4_5, optimize_prompt_mode="standard", optimize_prompt_thinking="auto")
    assert body["optimize_prompt_options"] == {"mode": "standard", "thinking": "auto"}
    with pytest.raises(JiMengConfigurationError) as caught:
        _build(model=MODEL_3_0, optimize_prompt_thinking="enabled")
    _assert_refused(caught.value, "optimize_prompt_thinking", ("is not supported by Seedream 3.0",))


@pytest.mark.parametrize("model", [MODEL_3_0, "doubao-seededit-3-0-i2i-250628", "ep-20240101123456-abcde"])
def test_seed_is_sent_to_the_families_that_take_it(model: str) -> None:
    assert _build(model=model, seed=7)["seed"] == 7


def test_guidance_scale_is_accepted_on_3_0() -> None:
    assert _build(model=MODEL_3_0, size="1024x1024", guidance_scale=2.5)["guidance_scale"] == 2.5
