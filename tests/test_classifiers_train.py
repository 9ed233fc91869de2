"""The classifier training CLI end to end on a generated FairFace-style folder whose labels are visible."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastfair.classifiers.model import load_classifier
from fastfair.classifiers.train import main, state_path

RACES = ["White", "Middle Eastern", "Latino_Hispanic", "East Asian", "Southeast Asian", "Black", "Indian"]
GROUP = {"White": 0, "Middle Eastern": 0, "Latino_Hispanic": 0, "East Asian": 3, "Southeast Asian": 3, "Black": 1,
         "Indian": 2}
AGES = ["3-9", "20-29", "30-39", "40-49", "60-69", "more than 70"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a shared, loaded machine OpenMP's
    waiting makes 2 threads many times slower than 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """140 noisy 24x24 images: the sign of red shows gender and its size age, green and blue the race group."""
    root = tmp_path_factory.mktemp("fairface")
    rng = np.random.default_rng(0)
    lines = ["file,age,gender,race,service_test"]
    for i in range(140):
        gender, race, age = rng.choice(["Male", "Female"]), rng.choice(RACES), rng.choice(AGES)
        old = AGES.index(age) >= 3
        group = GROUP[race]
        red = (0.8 if old else 0.3) * (1 if gender == "Male" else -1)
        level = np.array([red, 0.6 if group & 1 else -0.6, 0.6 if group & 2 else -0.6])
        pixels = np.clip(level + 0.2 * rng.standard_normal((24, 24, 3)), -1, 1)
        Image.fromarray(((pixels + 1) * 127.5).astype(np.uint8)).save(root / f"{i}.png")
        lines.append(f"{i}.png,{age},{gender},{race},True")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def arguments(dataset, out, *extra):
    return ["--data", str(dataset), "--labels", str(dataset / "labels.csv"), "--attributes", "gender,race,age",
            "--out", str(out), "--arch", "small_cnn", "--width", "16", "--size", "24", "--batch-size", "8",
            "--lr", "0.005", "--val-fraction", "0.2", "--workers", "0", "--quiet", *extra]


def test_training_reaches_high_accuracy_on_every_attribute(dataset, tmp_path):
    out = tmp_path / "clf.safetensors"
    result = main(arguments(dataset, out, "--epochs", "10"))
    accuracy = result["best"]["accuracy"]
    assert set(accuracy) == {"gender", "race", "age"}
    assert min(accuracy.values()) >= 0.9, accuracy
    classifier = load_classifier(str(out))
    assert classifier.head.classes("race") == ("WMELH", "Black", "Indian", "Asian")  # the public code's order
    from fastfair.classifiers.data import load_face_image

    image = load_face_image(str(dataset / "0.png"), 24)[None]
    assert set(classifier.probabilities(image)) == {"gender", "race", "age"}


CUDA_DROPOUT = ("--device", "cuda", "--arch", "mobilenet_v3_large")  # its dropout draws from the GPU's generator


@pytest.mark.parametrize("device", [(), pytest.param(CUDA_DROPOUT, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))], ids=["cpu", "cuda"])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(dataset, tmp_path, device):
    straight, resumed = tmp_path / "straight.safetensors", tmp_path / "resumed.safetensors"
    main(arguments(dataset, straight, "--epochs", "2", "--checkpoint-every", "4", *device))
    assert main(arguments(dataset, resumed, "--epochs", "2", "--checkpoint-every", "4", "--max-steps", "19",
                          *device)) is None
    if device:
        torch.cuda.manual_seed_all(12345)  # a fresh process's generator state, not the interrupted run's
    main(arguments(dataset, resumed, "--epochs", "2", "--checkpoint-every", "4", "--resume", *device))
    first = torch.load(state_path(str(straight)), weights_only=True)
    second = torch.load(state_path(str(resumed)), weights_only=True)
    assert first["position"] == second["position"] == {"epoch": 2, "batch": 0}
    for key, value in first["network"].items():
        assert torch.equal(value, second["network"][key]), key
    assert first["history"] == second["history"]
    with pytest.raises(ValueError, match="was made with"):
        main(arguments(dataset, resumed, "--epochs", "2", "--seed", "1", "--resume"))


def test_bad_arguments_fail_early(dataset, tmp_path):
    with pytest.raises(SystemExit):
        main(arguments(dataset, tmp_path / "x.safetensors", "--val-fraction", "1.5"))
    with pytest.raises(ValueError, match="no column 'colour'"):
        main(arguments(dataset, tmp_path / "x.safetensors") + ["--attributes", "colour"])


def test_saved_state_missing_images_and_bad_outputs_are_refused_before_training(dataset, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    main(arguments(dataset, out, "--epochs", "1"))
    saved = state_path(str(out))
    before = open(saved, "rb").read()
    with pytest.raises(ValueError, match="holds an earlier run's training state; pass --resume"):
        main(arguments(dataset, out, "--epochs", "1"))
    for changed in (["--lr", "0.5"], ["--weight-decay", "0.5"], ["--no-flip"]):  # what changes the result
        with pytest.raises(ValueError, match="was made with"):
            main(arguments(dataset, out, "--epochs", "1", "--resume") + changed)
    with pytest.raises(ValueError, match=r"--max-steps 1: the resumed run is already at step \d+"):
        main(arguments(dataset, out, "--epochs", "1", "--resume", "--max-steps", "1"))
    assert open(saved, "rb").read() == before
    labels = tmp_path / "labels.csv"
    labels.write_text((dataset / "labels.csv").read_text() + "missing.png,20-29,Male,White,True\n")
    with pytest.raises(ValueError, match=r"1 image file\(s\) named in the label table do not exist, e\.g\. missing"):
        main(arguments(dataset, tmp_path / "m.safetensors") + ["--labels", str(labels)])
    for extra, message in ((["--max-steps", "0"], "--max-steps must be >= 1"),
                           (["--out", str(tmp_path)], "a folder; give the classifier file to write")):
        with pytest.raises(SystemExit):
            main(arguments(dataset, tmp_path / "x.safetensors") + extra)
        assert message in capsys.readouterr().err
