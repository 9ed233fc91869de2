"""Image files of any bit depth read as the picture they hold, by every reader of image folders (face bank, classifier
training, evaluation's FID references), and label tables saved with a byte-order mark."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastfair.classifiers.data import load_face_image, read_label_table
from fastfair.evaluation.cache import from_png
from fastfair.faces.build_bank import read_image
from fastfair.image_files import read_rgb, to_rgb

GREY = 0.3  # of full scale


def _files(folder):
    """The same grey picture with a darker left half, as 8-bit, 16-bit greyscale PNG and TIFF, RGBA and palette."""
    level = np.full((6, 8), GREY)
    level[:, :4] *= 0.5
    eight, sixteen = np.rint(level * 255).astype(np.uint8), np.rint(level * 65535).astype(np.uint16)
    files = {"L.png": Image.fromarray(eight), "I16.png": Image.fromarray(sixteen),
             "I16.tif": Image.fromarray(sixteen), "RGBA.png": Image.fromarray(eight).convert("RGBA"),
             "P.png": Image.fromarray(eight).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)}
    for name, image in files.items():
        image.save(folder / name)
    return eight.astype(np.float32), [folder / name for name in files]


def test_every_bit_depth_reads_as_the_same_8_bit_picture(tmp_path):
    expected, paths = _files(tmp_path)
    assert Image.open(paths[1]).mode.startswith("I;16")  # the mode PIL's convert('RGB') clips at 255
    for path in paths:
        rgb = read_rgb(path)
        assert rgb.shape == (6, 8, 3) and rgb.dtype == np.float32
        np.testing.assert_allclose(rgb, np.repeat(expected[..., None], 3, -1), atol=1, err_msg=path.name)
    target = torch.from_numpy(expected) / 127.5 - 1
    for path in paths:  # through each reader: [-1, 1]
        torch.testing.assert_close(read_image(str(path))[0, 0], target, atol=2 / 255, rtol=0)
        torch.testing.assert_close(from_png([path])[0, 1], target, atol=2 / 255, rtol=0)
        crop = load_face_image(str(path), 6)  # shorter side 6: no resize, the centre 6 x 6
        torch.testing.assert_close(crop[2], target[:, 1:7], atol=2 / 255, rtol=0)


def test_floating_point_images_are_refused_by_name(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as image:
        assert image.mode == "F"
        with pytest.raises(ValueError, match=r"f.tif: a floating-point image .* save it with 8 or 16 bits"):
            to_rgb(image, tmp_path / "f.tif")
    assert read_image(str(tmp_path / "f.tif")) is None  # the bank skips it as unreadable
    with pytest.raises(ValueError, match="cannot read image .*f.tif"):
        load_face_image(str(tmp_path / "f.tif"), 4)


def test_a_label_table_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("file,gender\na.png,female\nb.png,male\n".encode("utf-8-sig"))
    table = read_label_table(str(path))
    assert table.files == ["a.png", "b.png"] and table.column("gender") == ["female", "male"]


def test_exif_orientation_is_applied_by_every_reader(tmp_path):
    """A camera's portrait photo is stored sideways with EXIF orientation 6 (turn 90 degrees clockwise to view):
    every reader sees it upright, as a viewer shows it."""
    upright = np.zeros((8, 4, 3), dtype=np.uint8)  # tall: H 8, W 4, with a bright top row
    upright[0] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the camera writes: W 8, H 4
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "portrait.png"
    stored.save(path, exif=exif)
    assert Image.open(path).size == (8, 4)
    np.testing.assert_array_equal(read_rgb(path), upright.astype(np.float32))
    assert read_image(str(path)).shape == (1, 3, 8, 4)
    crop = load_face_image(str(path), 4)  # shorter side 4: no resize, the centre 4 x 4 rows 2..5 (dark)
    assert crop.shape == (3, 4, 4) and float(crop.max()) == -1.0


def test_an_image_past_the_decompression_bomb_limit_is_an_unreadable_file(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((6, 8), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 48 pixels: past twice the limit, PIL refuses it
    with pytest.raises(ValueError, match="big.png: .*decompression bomb"):
        read_rgb(tmp_path / "big.png")
    assert read_image(str(tmp_path / "big.png")) is None  # the face bank skips and counts it
    with pytest.raises(ValueError, match="cannot read image .*big.png"):  # classifier training names it
        load_face_image(str(tmp_path / "big.png"), 4)


def test_a_32_bit_integer_image_is_scaled_as_16_bit(tmp_path):
    """Mode I, as older Pillow opens 16-bit PNGs: scaled by 255 / 65535 too, not clipped at 255 to white."""
    image = Image.fromarray(np.full((2, 3), round(0.3 * 65535), dtype=np.int32))
    assert image.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.full((2, 3, 3), round(0.3 * 255), dtype=np.uint8))
    # rounded, not truncated: 25699 / 257 = 99.996 is level 100
    image = Image.fromarray(np.full((2, 3), 257 * 100 - 1, dtype=np.int32))
    assert np.asarray(to_rgb(image)).min() == np.asarray(to_rgb(image)).max() == 100
