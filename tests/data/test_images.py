"""One image decoder (issue 21, item 3): every PIL mode becomes the right 8-bit RGB picture,
upright, in pre-training, fine-tuning, evaluation and predict alike."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from predet.data.images import UnreadableImageFile, image_size, open_rgb

RAMP = np.tile(np.linspace(0, 1, 32), (24, 1))  # a horizontal gradient, 32 wide, 24 high


def _saved(tmp_path, image: Image.Image, name: str, **kw) -> str:
    path = tmp_path / name
    image.save(path, **kw)
    return str(path)


def _grey(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image, dtype=np.float64)
    assert rgb.shape[2] == 3 and np.array_equal(rgb[..., 0], rgb[..., 1])
    return rgb[..., 0]


def test_a_16_bit_png_keeps_its_contrast(tmp_path):
    # PIL's convert("RGB") clips every value above 255: a 16-bit frame came out all white
    path = _saved(tmp_path, Image.fromarray((RAMP * 65535).astype(np.uint16)), "deep.png")
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_allclose(_grey(open_rgb(path)), RAMP * 255, atol=1)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I", "F"])
def test_every_mode_becomes_the_same_picture(tmp_path, mode):
    grey = Image.fromarray((RAMP * 255).round().astype(np.uint8), "L")
    if mode == "I":
        image = Image.fromarray((RAMP * 65535).astype(np.int32), "I")
    elif mode == "F":
        image = Image.fromarray(RAMP.astype(np.float32), "F")
    else:
        image = grey.convert(mode)
    name = "x.tiff" if mode in ("CMYK", "I", "F") else "x.png"
    decoded = open_rgb(_saved(tmp_path, image, name))
    assert decoded.mode == "RGB" and decoded.size == (32, 24)
    tolerance = 255 if mode == "1" else 2  # bilevel: only the dark and light halves survive
    if mode == "1":
        assert set(np.unique(_grey(decoded))) <= {0.0, 255.0}
    else:
        np.testing.assert_allclose(_grey(decoded), RAMP * 255, atol=tolerance)


def test_exif_orientation_is_applied_and_sized_alike(tmp_path):
    image = Image.fromarray((RAMP * 255).astype(np.uint8), "L").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: upright it is 24 wide, 32 high
    path = _saved(tmp_path, image, "turned.jpg", exif=exif.tobytes())
    assert open_rgb(path).size == (24, 32) == image_size(path)
    assert open_rgb(io.BytesIO(open(path, "rb").read())).size == (24, 32)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableImageFile, match="not a regular file"):
        open_rgb(fifo)
    with pytest.raises(UnreadableImageFile, match="not a regular file"):
        image_size(fifo)


def _coco(tmp_path, image: Image.Image, width: int, height: int, **save) -> tuple:
    import json

    image.save(tmp_path / "a.png" if not save else tmp_path / "a.jpg", **save)
    name = "a.png" if not save else "a.jpg"
    ann = {"images": [{"id": 1, "file_name": name, "width": width, "height": height}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return tmp_path / "ann.json", tmp_path


def test_the_detection_sets_read_16_bit_frames_as_they_look(tmp_path):
    from predet.data.coco import CocoDetection

    deep = Image.fromarray((RAMP * 65535).astype(np.uint16))
    for train in (False, True):  # evaluation and training read the same pixels
        dataset = CocoDetection(*_coco(tmp_path, deep, 32, 24), train=train, flip_p=0.0, masks=False)
        image = dataset[(0, 0)][0] if train else dataset[0][0]
        np.testing.assert_allclose(image[0].double().numpy(), RAMP * 255, atol=1)


def test_a_record_sized_for_the_stored_image_names_the_exif_turn(tmp_path):
    from predet.data.coco import CocoDetection
    from predet.data.coco_json import AnnotationError

    exif = Image.Exif()
    exif[0x0112] = 6
    image = Image.fromarray((RAMP * 255).astype(np.uint8), "L").convert("RGB")
    dataset = CocoDetection(*_coco(tmp_path, image, 32, 24, exif=exif.tobytes()), masks=False)
    with pytest.raises(AnnotationError, match="EXIF orientation turns it upright"):
        dataset[0]
