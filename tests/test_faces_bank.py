"""Building a face bank from a folder: skips, resume after an interruption, the CLI."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.torch import save_file
import torch
from PIL import Image

from fastfair.faces.align import align_faces
from fastfair.faces.bank import FaceBank
from fastfair.faces import build_bank as build_bank_module
from fastfair.faces.build_bank import build_bank, list_images, main, partial_path, read_image, skipped_path
from fastfair.faces.detect import CallableDetector, get_detector
from fastfair.faces.embed import FaceEmbedder
from fastfair.faces.regions import locate_faces
from fastfair.faces.sfnet import SFNet


@pytest.fixture
def folder(tmp_path):
    """7 readable images (2 in a subfolder; 'blank' has no face), one corrupt file, one text file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    (root / "sub").mkdir(parents=True)
    for i in range(7):
        size = (40 + 4 * i, 48)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        name = f"sub/img{i}.png" if i >= 5 else f"img{i}.jpg"
        Image.fromarray(pixels).save(root / name, quality=95)
    Image.fromarray(np.zeros((48, 48, 3), dtype=np.uint8)).save(root / "blank.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("ignored")
    return str(root)


def centre_face(rgb):
    """A toy detector: a centred face, unless the image is black."""
    height, width = rgb.shape[:2]
    return [] if rgb.max() == 0 else [(width * 0.2, height * 0.2, width * 0.8, height * 0.8, 1.0)]


def tiny_embedder():
    torch.manual_seed(0)
    return FaceEmbedder(SFNet(depths=(0, 1, 0, 0), channels=(4, 4, 4, 4), out_dim=8).eval())


class Interrupting:
    """Wraps an embedder; raises KeyboardInterrupt on call number ``stop`` (counting from 1)."""

    def __init__(self, embedder, stop):
        self.embedder, self.stop, self.calls = embedder, stop, 0
        self.input_size = embedder.input_size

    def __call__(self, faces):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.embedder(faces)


def test_build_skips_unreadable_and_faceless_images_and_embeds_aligned_faces(folder, tmp_path):
    embedder, detector = tiny_embedder(), CallableDetector(centre_face)
    out = str(tmp_path / "bank.safetensors")
    summary = build_bank(folder, out, embedder, detector, batch_size=2, progress_bar=False)
    assert summary == {"images": 9, "embedded": 7, "unreadable": 1, "no_face": 1, "unreadable_folders": 0}
    # named, not only counted: the user could not tell which files to fix
    assert open(skipped_path(out)).read() == "unreadable\tbroken.jpg\nno face found\tblank.png\n"
    bank = FaceBank.load(out, use_faiss=False)
    assert bank.files == ["img0.jpg", "img1.jpg", "img2.jpg", "img3.jpg", "img4.jpg", "sub/img5.png", "sub/img6.png"]
    image = read_image(os.path.join(folder, "sub/img5.png"))
    with torch.no_grad():
        direct = embedder(align_faces(image, locate_faces(image, detector).landmarks.float()))
    assert torch.allclose(bank.embeddings[5], direct[0], atol=1e-6)
    assert not os.path.exists(partial_path(out))


def test_nothing_embedded_says_why_and_a_pickled_bank_is_named(folder, tmp_path):
    embedder = tiny_embedder()
    out = str(tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match=r"from 9 image\(s\) in .* \(1 unreadable, 8 without a face found\)"):
        build_bank(folder, out, embedder, CallableDetector(lambda rgb: []), progress_bar=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"from 0 image\(s\) .*\(no file named \*\.jpg, \*\.jpeg"):
        build_bank(str(tmp_path / "empty"), out, embedder, CallableDetector(centre_face), progress_bar=False)
    pickled = tmp_path / "features.safetensors"
    torch.save({"features": torch.zeros(2, 4)}, pickled)  # as the public code keeps its face features
    with pytest.raises(ValueError, match=r"features.safetensors: not a safetensors face bank .*build_bank"):
        FaceBank.load(str(pickled))


def test_resume_after_an_interruption_gives_the_same_bank(folder, tmp_path):
    embedder, detector = tiny_embedder(), CallableDetector(centre_face)
    straight = str(tmp_path / "straight.safetensors")
    build_bank(folder, straight, embedder, detector, batch_size=2, progress_bar=False)
    out = str(tmp_path / "resumed.safetensors")
    with pytest.raises(KeyboardInterrupt):
        build_bank(folder, out, Interrupting(embedder, stop=3), detector, batch_size=2, save_every=1,
                   progress_bar=False)
    assert os.path.exists(partial_path(out)) and not os.path.exists(out)
    counting = Interrupting(embedder, stop=0)
    build_bank(folder, out, counting, detector, batch_size=2, save_every=1, progress_bar=False)
    assert counting.calls == 2  # only the 3 faces after the 4 saved ones were embedded again
    first, second = FaceBank.load(straight, use_faiss=False), FaceBank.load(out, use_faiss=False)
    assert first.files == second.files
    assert torch.allclose(first.embeddings, second.embeddings, atol=1e-6)
    assert not os.path.exists(partial_path(out))


def test_resume_refuses_other_settings_unless_restarted(folder, tmp_path):
    embedder, detector = tiny_embedder(), CallableDetector(centre_face)
    out = str(tmp_path / "bank.safetensors")
    with pytest.raises(KeyboardInterrupt):
        build_bank(folder, out, Interrupting(embedder, stop=2), detector, batch_size=2, save_every=1,
                   settings="a", progress_bar=False)
    with pytest.raises(ValueError, match="other settings"):
        build_bank(folder, out, embedder, detector, settings="b", progress_bar=False)
    summary = build_bank(folder, out, embedder, detector, settings="b", restart=True, progress_bar=False)
    assert summary["embedded"] == 7


def test_cli_builds_a_bank_with_a_local_sfnet_checkpoint(folder, tmp_path, capsys):
    weights = str(tmp_path / "sfnet.pth")
    torch.save(tiny_embedder().network.state_dict(), weights)
    out = str(tmp_path / "cli.safetensors")
    main(["--images", folder, "--out", out, "--embedder", weights, "--detector", "none", "--batch-size", "4"])
    assert (f"embedded 8 of 9 images; skipped 1 unreadable and 0 without a face (listed in {out}.skipped.txt)"
            in capsys.readouterr().out)
    bank = FaceBank.load(out, use_faiss=False)
    assert len(bank) == 8 and bank.dim == 8
    assert torch.allclose(bank.embeddings.norm(dim=1), torch.ones(8), atol=1e-5)


def test_cli_refuses_a_folder_as_out_and_an_unimportable_factory_before_embedding(folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--images", folder, "--out", str(tmp_path), "--embedder", "x.pth", "--detector", "none"])
    assert "a folder; give the bank file to write" in capsys.readouterr().err
    for spec, message in (("nope_module:fn", "No module named 'nope_module'"),
                          ("fastfair.toy:nope", "has no attribute 'nope'")):
        with pytest.raises(ValueError, match=rf"--embedder-factory='{spec}': cannot import it \(.*{message}"):
            main(["--images", folder, "--out", str(tmp_path / "b.safetensors"), "--embedder-factory", spec,
                  "--detector", "none"])


def test_images_in_symlinked_folders_are_found_once(folder, tmp_path):
    """A bank folder made of links to the datasets: os.walk skipped their images unless told to follow links."""
    elsewhere = tmp_path / "elsewhere" / "ffhq"
    elsewhere.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(elsewhere / "real.png")
    os.symlink(elsewhere, os.path.join(folder, "ffhq"))
    os.symlink(elsewhere, os.path.join(folder, "sub", "ffhq_again"))  # a second link to a folder already read
    os.symlink(folder, os.path.join(folder, "sub", "loop"))  # a cycle: a link back up the tree
    found = list_images(folder)
    assert "ffhq/real.png" in found and not any("ffhq_again" in name or "loop" in name for name in found)
    assert len(found) == 10  # the fixture's 9 images and the linked one, each once


def test_an_image_above_pils_decompression_limit_is_skipped_as_unreadable(folder, tmp_path, monkeypatch):
    """PIL refuses it with DecompressionBombError (not an OSError): counted as unreadable, PIL's limit kept."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the fixture's images stay below; twice it is refused
    Image.new("RGB", (200, 200)).save(os.path.join(folder, "huge.png"))
    summary = build_bank(folder, str(tmp_path / "bank.safetensors"), tiny_embedder(), CallableDetector(centre_face),
                         progress_bar=False)
    assert summary == {"images": 10, "embedded": 7, "unreadable": 2, "no_face": 1, "unreadable_folders": 0}
    assert Image.MAX_IMAGE_PIXELS == 10_000


def test_resume_after_the_folder_changed_holds_exactly_its_current_files(folder, tmp_path):
    """Files removed since the partial save left the bank and the counts ('embedded 6 of 3 images')."""
    embedder, detector = tiny_embedder(), CallableDetector(centre_face)
    out = str(tmp_path / "resumed.safetensors")
    with pytest.raises(KeyboardInterrupt):  # saved: img0-img3 embedded, blank (no face), broken (unreadable)
        build_bank(folder, out, Interrupting(embedder, stop=3), detector, batch_size=2, save_every=1,
                   progress_bar=False)
    os.remove(os.path.join(folder, "img1.jpg"))
    os.remove(os.path.join(folder, "broken.jpg"))
    shutil.copy(os.path.join(folder, "img4.jpg"), os.path.join(folder, "a_new.jpg"))  # sorts before the saved ones
    summary = build_bank(folder, out, embedder, detector, batch_size=2, save_every=1, progress_bar=False)
    straight = str(tmp_path / "straight.safetensors")
    assert summary == build_bank(folder, straight, embedder, detector, batch_size=2, progress_bar=False)
    assert summary == {"images": 8, "embedded": 7, "unreadable": 0, "no_face": 1, "unreadable_folders": 0}
    first, second = FaceBank.load(straight, use_faiss=False), FaceBank.load(out, use_faiss=False)
    assert second.files == first.files and "img1.jpg" not in second.files and second.files[0] == "a_new.jpg"
    assert torch.allclose(first.embeddings, second.embeddings, atol=1e-6)


def test_resume_refuses_an_embedder_file_rewritten_under_the_same_path(folder, tmp_path, monkeypatch, capsys):
    weights, out = str(tmp_path / "sfnet.pth"), str(tmp_path / "bank.safetensors")
    torch.save(tiny_embedder().network.state_dict(), weights)
    command = ["--images", folder, "--out", out, "--embedder", weights, "--detector", "none", "--batch-size", "2",
               "--save-every", "1"]
    _interrupted_cli_build(monkeypatch, command)
    written = os.stat(weights).st_mtime_ns
    os.utime(weights, ns=(written, written + 10 ** 9))  # new weights under the same name
    with pytest.raises(ValueError, match=r"the --embedder file changed since the partial build .*--restart"):
        main(command)
    assert os.path.exists(partial_path(out)) and not os.path.exists(out)  # the saved progress is kept
    os.utime(weights, ns=(written, written))
    from safetensors.torch import load_file
    from fastfair.files import read_safetensors_metadata, save_safetensors

    progress = json.loads(read_safetensors_metadata(partial_path(out))["progress"])  # as an older build saved it
    settings = json.loads(progress["settings"])
    del settings["embedder_file"], settings["images"], progress["stats"]
    progress["settings"] = json.dumps(settings)
    save_safetensors(load_file(partial_path(out)), partial_path(out), {"progress": json.dumps(progress)})
    capsys.readouterr()
    assert main(command)["embedded"] == 8
    notes = capsys.readouterr().err
    assert "does not record the embedder file's size and mtime (an older build): resuming" in notes
    assert f"does not record its --images folder (an older build): resuming, on the assumption that it is {folder}" \
        in notes
    assert "does not record the sizes and mtimes of the files it read (an older build): resuming" in notes
    recorded = FaceBank.load(out, use_faiss=False).settings["embedder_file"]
    assert recorded == {"path": weights, "size": os.path.getsize(weights), "mtime_ns": written}


def no_face_anywhere(rgb):
    """A detector (one uint8 image [H, W, 3] -> its faces) that never finds one."""
    return []


def test_cli_takes_detector_fallback_lists_and_the_insightface_root_as_evaluate_does(folder, tmp_path):
    out, missing = str(tmp_path / "bank.safetensors"), str(tmp_path / "missing.pth")
    network = str(tmp_path / "sfnet.pth")
    torch.save(tiny_embedder().network.state_dict(), network)
    summary = main(["--images", folder, "--out", out, "--embedder", network, "--detector",
                    f"{__name__}:no_face_anywhere,none"])
    assert summary["embedded"] == 8  # 'none' took every image the first one found no face in
    assert json.loads(FaceBank.load(out, use_faiss=False).info["settings"])["detector"] == \
        f"{__name__}:no_face_anywhere,none"
    # refused before the (here missing) embedder is loaded
    with pytest.raises(ValueError, match="--detector 'opencvv': expected opencv | insightface | mtcnn | none"):
        main(["--images", folder, "--out", out, "--embedder", missing, "--detector", "opencvv"])
    with pytest.raises(ValueError, match="--detector-path .*: the insightface model root, but --detector 'none'"):
        main(["--images", folder, "--out", out, "--embedder", missing, "--detector", "none", "--detector-path",
              str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=f"insightface model pack not found at {tmp_path}/models/buffalo_l"):
        main(["--images", folder, "--out", out, "--embedder", missing, "--detector", "insightface,mtcnn",
              "--detector-path", str(tmp_path)])


def test_read_image_keeps_a_non_square_image_upright(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 36, 3), dtype=np.uint8)  # H 20, W 36
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = read_image(str(tmp_path / "wide.png"))
    assert image.shape == (1, 3, 20, 36)
    torch.testing.assert_close(image[0].permute(1, 2, 0), torch.from_numpy(pixels).float() / 127.5 - 1)


def test_a_resume_reads_again_the_files_rewritten_since_the_partial_save(folder, tmp_path, capsys):
    """A file rewritten under its name since the partial build read it (size, mtime) is read again: its old
    embedding would sit under its name in the bank, an unreadable one would stay skipped. The bank equals an
    uninterrupted build of the folder as it is now."""
    embedder, detector = tiny_embedder(), CallableDetector(centre_face)
    out = str(tmp_path / "resumed.safetensors")
    with pytest.raises(KeyboardInterrupt):  # saved: img0-img3 embedded, blank (no face), broken (unreadable)
        build_bank(folder, out, Interrupting(embedder, stop=3), detector, batch_size=2, save_every=1,
                   progress_bar=False)
    pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, "img2.jpg"), quality=95)  # another face, same name
    Image.fromarray(pixels[::-1]).save(os.path.join(folder, "broken.jpg"), quality=95)  # now readable
    capsys.readouterr()
    summary = build_bank(folder, out, embedder, detector, batch_size=2, save_every=1, progress_bar=False)
    assert "note: 2 file(s) of the partial build changed" in capsys.readouterr().err
    straight = str(tmp_path / "straight.safetensors")
    assert summary == build_bank(folder, straight, embedder, detector, batch_size=2, progress_bar=False)
    assert summary["embedded"] == 8 and summary["unreadable"] == 0
    first, second = FaceBank.load(straight, use_faiss=False), FaceBank.load(out, use_faiss=False)
    assert second.files == first.files
    torch.testing.assert_close(second.embeddings, first.embeddings, atol=1e-6, rtol=0)


def _interrupted_cli_build(monkeypatch, command):
    """main(command) stopped right after its first progress save."""
    saving = build_bank_module.save_progress

    def save_then_stop(*args):
        saving(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(build_bank_module, "save_progress", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(command)
    monkeypatch.setattr(build_bank_module, "save_progress", saving)


def test_a_partial_build_of_another_images_folder_is_refused(folder, tmp_path, monkeypatch):
    weights, out = str(tmp_path / "sfnet.pth"), str(tmp_path / "bank.safetensors")
    torch.save(tiny_embedder().network.state_dict(), weights)
    other = tmp_path / "other"
    shutil.copytree(folder, other)  # the same file names: the first build's faces would be filed under them
    flags = ["--out", out, "--embedder", weights, "--detector", "none", "--batch-size", "2", "--save-every", "1"]
    _interrupted_cli_build(monkeypatch, ["--images", folder, *flags])
    with pytest.raises(ValueError, match=rf"partial build of another --images folder \({folder}, now {other}\).*"
                                         "--restart to discard it"):
        main(["--images", str(other), *flags])
    assert main(["--images", folder, *flags])["embedded"] == 8  # the folder it was building finishes it


def test_a_corrupt_partial_build_or_one_of_another_embedder_dimension_names_restart(folder, tmp_path, monkeypatch):
    embedder, detector = tiny_embedder(), CallableDetector(centre_face)
    out = str(tmp_path / "bank.safetensors")
    with open(partial_path(out), "w") as junk:
        junk.write("junk")
    with pytest.raises(ValueError, match="not a partial face-bank build this version can resume .*--restart"):
        build_bank(folder, out, embedder, detector, progress_bar=False)
    with pytest.raises(KeyboardInterrupt):
        build_bank(folder, out, Interrupting(embedder, stop=2), detector, batch_size=2, save_every=1,
                   restart=True, progress_bar=False)
    torch.manual_seed(0)
    wider = FaceEmbedder(SFNet(depths=(0, 1, 0, 0), channels=(4, 4, 4, 4), out_dim=16).eval())
    with pytest.raises(ValueError, match="gives 16 features per face where the partial build .* holds 8.*--restart"):
        build_bank(folder, out, wider, detector, batch_size=2, progress_bar=False)


def test_folders_that_cannot_be_read_are_counted_and_the_top_one_is_an_error(folder, tmp_path, monkeypatch, capsys):
    scandir = os.scandir

    def refusing(path="."):
        if os.path.basename(os.fspath(path)) == "sub":  # as a folder without read permission (tests run as root)
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    embedder, detector = tiny_embedder(), CallableDetector(centre_face)
    summary = build_bank(folder, str(tmp_path / "bank.safetensors"), embedder, detector, progress_bar=False)
    assert summary == {"images": 7, "embedded": 5, "unreadable": 1, "no_face": 1, "unreadable_folders": 1}
    assert "note: 1 folder(s) below" in capsys.readouterr().err
    with pytest.raises(PermissionError, match="--images .*sub: cannot list its files"):
        list_images(os.path.join(folder, "sub"))


class BareNetwork(torch.nn.Module):
    """A network without an embedder's settings, at 96 x 96 (as --embedder-factory may give)."""

    input_size = 96

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.sfnet = SFNet(depths=(0, 1, 0, 0), channels=(4, 4, 4, 4), out_dim=8, input_size=96).eval()

    def forward(self, faces):
        return self.sfnet(faces)


def bare_network_96():
    return BareNetwork()


def flip_summing_embedder():
    return tiny_embedder()


def test_a_factory_network_is_embedded_at_its_input_size_and_an_embedder_keeps_its_own_flip(folder, tmp_path):
    """As training takes faces.embedding_fn (fastfair.judges): a bare network is aligned at its input_size, and an
    embedder with its own flip setting is used as it is, its flip recorded (--no-flip recorded a flip it did not
    make, and the face loss then refused the bank)."""
    out = str(tmp_path / "bank.safetensors")
    main(["--images", folder, "--out", out, "--embedder-factory", f"{__name__}:bare_network_96", "--detector",
          "none", "--no-flip"])
    bank = FaceBank.load(out, use_faiss=False)
    image = read_image(os.path.join(folder, "img0.jpg"))
    aligned = align_faces(image, locate_faces(image, get_detector("none")).landmarks.float(), size=96)
    expected = FaceEmbedder(bare_network_96(), flip=False, input_size=96)(aligned)
    torch.testing.assert_close(bank.embeddings[bank.files.index("img0.jpg")], expected[0], atol=1e-5, rtol=0)
    assert bank.flip is False
    flipped = str(tmp_path / "flipped.safetensors")
    main(["--images", folder, "--out", flipped, "--embedder-factory", f"{__name__}:flip_summing_embedder",
          "--detector", "none"])
    assert FaceBank.load(flipped, use_faiss=False).flip is True
    with pytest.raises(ValueError, match="--no-flip: --embedder-factory .* adds the mirrored face's features itself"):
        main(["--images", folder, "--out", str(tmp_path / "other.safetensors"), "--embedder-factory",
              f"{__name__}:flip_summing_embedder", "--detector", "none", "--no-flip"])


def test_a_finished_bank_or_the_embedder_itself_is_never_overwritten(folder, tmp_path, capsys):
    """--out holding a finished bank (or any file) was replaced without a word, the --embedder file too when --out
    named it (its weights lost); a folder or another model's file as --embedder, a file as --images and counts
    below 1 are named by flag."""
    weights, out = str(tmp_path / "sfnet.pth"), str(tmp_path / "bank.safetensors")
    torch.save(tiny_embedder().network.state_dict(), weights)
    flags = ["--images", folder, "--embedder", weights, "--detector", "none"]
    main([*flags, "--out", out])
    finished = open(out, "rb").read()
    with pytest.raises(ValueError, match=f"--out {out} exists already .* choose another --out, or move or delete"):
        main([*flags, "--out", out])
    assert open(out, "rb").read() == finished
    before = open(weights, "rb").read()
    for args, message in (
            ([*flags, "--out", weights], f"--out {weights} is the --embedder file: give the bank its own file"),
            (["--images", folder, "--embedder", str(tmp_path), "--detector", "none", "--out", str(tmp_path / "b")],
             f"--embedder {tmp_path} is a folder: give the SFNet checkpoint file"),
            ([*flags, "--out", str(tmp_path / "c.safetensors"), "--batch-size", "0"],
             "--batch-size: '0': expected a whole number >= 1"),
            ([*flags, "--out", str(tmp_path / "c.safetensors"), "--save-every", "-1"],
             "--save-every: '-1': expected a whole number >= 1")):
        with pytest.raises(SystemExit):
            main(args)
        assert message in capsys.readouterr().err
    assert open(weights, "rb").read() == before
    with pytest.raises(ValueError, match=f"--images {weights} is a file: give the folder of face images"):
        main(["--images", weights, "--embedder", weights, "--detector", "none", "--out", str(tmp_path / "d")])
    not_sfnet = str(tmp_path / "other.safetensors")
    save_file({"features.0.weight": torch.zeros(2)}, not_sfnet)
    with pytest.raises(ValueError, match=f"--embedder {not_sfnet}: .*; give an SFNet checkpoint"):
        main(["--images", folder, "--embedder", not_sfnet, "--detector", "none", "--out", str(tmp_path / "e")])


def test_a_device_that_cannot_run_here_is_refused_by_name(folder, tmp_path, capsys):
    for device, message in (("gpu", "--device gpu: not a device torch knows"),
                            ("cuda:99", "--device cuda:99: ")):
        with pytest.raises(SystemExit):
            main(["--images", folder, "--out", str(tmp_path / "b.safetensors"), "--embedder", "x.pth",
                  "--device", device])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_nearest_bank_face_under_autocast_is_the_exact_search_s(dtype):
    """Training's face loss searches the bank under autocast, which ran the similarity matmul in half precision:
    near-ties then went to other faces (bf16: 2.7 % of queries)."""
    generator = torch.Generator().manual_seed(0)
    bank = FaceBank(torch.randn(400, 16, generator=generator), use_faiss=False)
    # queries close to a bank face and to its near-twin: the top two similarities differ in the 4th digit
    twins = bank.embeddings[:200] + 1e-3 * torch.randn(200, 16, generator=generator)
    queries = bank.embeddings[:200] + 1e-3 * torch.randn(200, 16, generator=generator)
    both = FaceBank(torch.cat([bank.embeddings[:200], twins]), use_faiss=False)
    expected = (queries.double() @ both.embeddings.double().T).argmax(1)
    with torch.autocast("cpu", dtype=dtype):
        index, similarity = both.nearest(queries)
    assert similarity.dtype == torch.float32 and torch.equal(index, expected)


@pytest.mark.parametrize("use_faiss", [False, True])
def test_a_query_holding_a_nan_has_no_nearest_bank_face(use_faiss):
    """A diverged step's face embedding: its similarity is NaN, not a bank face's (the torch search said -inf and
    row 0); the other queries in the batch keep their nearest faces."""
    if use_faiss:
        pytest.importorskip("faiss")
    generator = torch.Generator().manual_seed(0)
    bank = FaceBank(torch.randn(50, 8, generator=generator), use_faiss=use_faiss)
    queries = bank.embeddings[[3, 7, 11]].clone()
    queries[1, 2], queries[2, 0] = float("nan"), float("inf")
    index, similarity = bank.nearest(queries)
    assert index.tolist() == [3, 0, 0] and similarity[0] == pytest.approx(1.0, abs=1e-5)
    assert similarity[1:].isnan().all()
