"""Face realism loss, the face bank's search, and the SFNet embedding model."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fastfair.faces.align import align_faces, template
from fastfair.faces.bank import FaceBank, faiss_available
from fastfair.faces.embed import FaceEmbedder, load_face_embedder, load_sfnet
from fastfair.faces.sfnet import SFNet, sfnet
from fastfair.losses.face import face_realism_loss, original_is_target, original_shows_targets


def tiny_sfnet(out_dim=16):
    torch.manual_seed(0)
    return SFNet(depths=(1, 1, 2, 1), channels=(4, 6, 8, 8), out_dim=out_dim)


def random_bank(count=50, dim=16, seed=0):
    embeddings = F.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return FaceBank(embeddings, [f"face{i}.jpg" for i in range(count)], use_faiss=False)


def test_sfnet20_has_opensphere_layout_and_20_conv_layers():
    with torch.device("meta"):
        network = sfnet("sfnet20")
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    convs = [k for k in shapes if k.endswith(".weight") and len(shapes[k]) == 4]
    assert len(convs) == 20
    assert shapes["layer1.0.conv.weight"] == (64, 3, 3, 3) and shapes["layer3.4.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["fc.weight"] == (512, 512 * 7 * 7) and "layer4.2.conv1.weight" not in shapes


def test_sfnet_checkpoints_load_with_shape_read_from_the_file(tmp_path):
    network = tiny_sfnet()
    faces = torch.rand(2, 3, 112, 112) * 2 - 1
    # opensphere saved its backbone from nn.DataParallel: keys carry "module."
    torch.save({f"module.{k}": v for k, v in network.state_dict().items()}, tmp_path / "backbone.pth")
    from safetensors.torch import save_file

    save_file(network.state_dict(), str(tmp_path / "backbone.safetensors"))
    for name in ("backbone.pth", "backbone.safetensors"):
        loaded = load_sfnet(str(tmp_path / name))
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert torch.equal(loaded(faces), network(faces).detach())
    with pytest.raises(ValueError, match="not an SFNet"):
        torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
        load_sfnet(str(tmp_path / "other.pth"))


def test_embedder_sums_the_flipped_features_and_normalizes(tmp_path):
    network = tiny_sfnet()
    faces = torch.rand(3, 3, 112, 112) * 2 - 1
    expected = F.normalize(network(faces) + network(faces.flip(-1)), dim=-1)
    assert torch.allclose(FaceEmbedder(network)(faces), expected, atol=1e-6)
    assert torch.allclose(FaceEmbedder(network, flip=False)(faces), F.normalize(network(faces), dim=-1), atol=1e-6)
    torch.save(network.state_dict(), tmp_path / "sfnet.pth")
    assert torch.allclose(load_face_embedder(str(tmp_path / "sfnet.pth"))(faces), expected, atol=1e-6)
    with pytest.raises(ValueError, match="aligned crops"):
        FaceEmbedder(network)(torch.zeros(1, 3, 64, 64))


def test_bank_nearest_in_chunks_matches_brute_force_and_survives_save_load(tmp_path):
    bank = random_bank()
    queries = torch.randn(9, 16)
    index, similarity = bank.nearest(queries, chunk_size=7)
    brute = F.normalize(queries, dim=-1) @ bank.embeddings.T
    assert torch.equal(index, brute.argmax(1)) and torch.allclose(similarity, brute.max(1).values)
    bank.save(str(tmp_path / "bank.safetensors"), dtype=torch.float16)
    loaded = FaceBank.load(str(tmp_path / "bank.safetensors"), use_faiss=False)
    assert loaded.files == bank.files and loaded.info["format"] == "fastfair-face-bank-1"
    assert torch.allclose(loaded.embeddings, bank.embeddings, atol=2e-3)
    with pytest.raises(ValueError, match=r"queries must be \[N, 16\]"):
        bank.nearest(torch.zeros(2, 8))


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_faiss_search_agrees_with_the_matrix_product():
    bank = random_bank()
    queries = torch.randn(9, 16)
    indices, similarities = FaceBank(bank.embeddings, use_faiss=True).nearest(queries)
    assert torch.equal(indices, bank.nearest(queries)[0])
    assert torch.allclose(similarities, bank.nearest(queries)[1], atol=1e-6)


def test_an_installed_faiss_is_used_only_when_asked(monkeypatch, tmp_path):
    """Installing faiss switched every bank's search to it (the trainer's too: a CPU search beside GPU queries)."""
    searched = []

    class FlatIndex:  # what faiss.IndexFlatIP does, recording that it ran
        def __init__(self, dim):
            self.rows = torch.empty(0, dim)

        def add(self, rows):
            self.rows = torch.cat([self.rows, torch.from_numpy(rows)])

        def search(self, queries, k):
            searched.append(len(queries))
            best = (torch.from_numpy(queries) @ self.rows.T).max(dim=1)
            return best.values[:, None].numpy(), best.indices[:, None].numpy()

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=FlatIndex))
    bank = random_bank()
    bank.save(str(tmp_path / "bank.safetensors"))
    queries = torch.randn(9, 16)
    for default in (FaceBank(bank.embeddings), FaceBank.load(str(tmp_path / "bank.safetensors"))):
        assert torch.equal(default.nearest(queries)[0], bank.nearest(queries)[0])
    assert searched == []
    assert torch.equal(FaceBank(bank.embeddings, use_faiss=True).nearest(queries)[0], bank.nearest(queries)[0])
    assert searched == [9]


def test_face_loss_is_zero_on_a_bank_face_and_one_minus_cosine_otherwise():
    bank = random_bank()
    on_bank = bank.embeddings[[3, 17]] * 2.5  # any scale: the loss normalizes
    assert torch.allclose(face_realism_loss(on_bank, bank), torch.zeros(2), atol=1e-6)
    queries = torch.randn(4, 16)
    expected = 1 - (F.normalize(queries, dim=-1) @ bank.embeddings.T).max(1).values
    assert torch.allclose(face_realism_loss(queries, bank, chunk_size=5), expected, atol=1e-6)


def test_original_face_check_takes_each_attribute_on_its_own():
    """gender x race: each attribute's own confidence must reach the level (the public code's check), not the
    joint cell's probability, their product."""
    gender = torch.tensor([[0.95, 0.05]] * 4).log()
    race = torch.tensor([[0.90, 0.04, 0.03, 0.03], [0.85, 0.05, 0.05, 0.05], [0.90, 0.04, 0.03, 0.03],
                         [0.90, 0.04, 0.03, 0.03]]).log()
    targets = {"gender": torch.tensor([0, 0, 0, -1]), "race": torch.tensor([0, 0, 1, 0])}
    shown = original_shows_targets({"gender": gender, "race": race}, targets, confidence=0.9)
    # row 0: 0.95 and 0.90 (cell 0.855) kept; row 1: race 0.85; row 2: another race; row 3: no gender target
    assert shown.tolist() == [True, False, False, False]
    assert original_shows_targets({"gender": gender}, {"gender": targets["gender"]}, 0.9).tolist() == [
        True, True, True, False]
    with pytest.raises(ValueError, match="at least one attribute"):
        original_shows_targets({"gender": gender}, {}, 0.9)


def test_original_face_is_the_target_where_the_original_already_has_the_target_class():
    bank = random_bank()
    current, original = torch.randn(3, 16), torch.randn(3, 16)
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4]])
    targets = torch.tensor([0, 1, 0])
    use = original_is_target(probs, targets, confidence=0.9)
    assert use.tolist() == [True, False, False]  # row 1: other class; row 2: not confident
    assert original_is_target(probs, torch.tensor([-1, -1, -1])).sum() == 0
    # the confidence is a lower bound that counts: exactly 0.75 at a confidence 0.75 is shown
    assert original_is_target(torch.tensor([[0.75, 0.25]]), torch.tensor([0]), confidence=0.75).tolist() == [True]
    loss = face_realism_loss(current, bank, original_embeddings=original, use_original=use)
    cosine = F.cosine_similarity(current[0], original[0], dim=0)
    assert torch.allclose(loss[0], 1 - cosine, atol=1e-6)
    assert torch.allclose(loss[1:], face_realism_loss(current[1:], bank), atol=1e-6)
    with pytest.raises(ValueError, match="original_embeddings"):
        face_realism_loss(current, bank, use_original=use)


def test_gradient_descent_on_pixels_moves_the_face_toward_a_bank_face():
    torch.manual_seed(1)
    network = SFNet(depths=(1, 1, 1, 1), channels=(4, 6, 8, 8), out_dim=16, input_size=48).requires_grad_(False)
    embedder = FaceEmbedder(network, input_size=48)
    bank = FaceBank(embedder(torch.rand(5, 3, 48, 48) * 2 - 1), use_faiss=False)
    image = (torch.rand(1, 3, 64, 64) * 2 - 1).requires_grad_(True)
    landmarks = template(48)[None] + 8.0  # the face sits at (8, 8) in the image
    optimizer = torch.optim.Adam([image], lr=0.02)
    losses = []
    for _ in range(20):
        loss = face_realism_loss(embedder(align_faces(image, landmarks, size=48)), bank).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert image.grad.abs().sum() > 0
    assert losses[-1] < 0.5 * losses[0], losses


def test_bank_rows_are_normalized_so_the_search_is_by_cosine():
    """A bank given rows of other norms (another tool's file, a float16 round trip) searches by cosine and hands
    the face loss unit targets: a long row must not win by its length."""
    bank = FaceBank(torch.tensor([[3.0, 0.0], [0.0, 0.5]]), use_faiss=False)
    index, similarity = bank.nearest(torch.tensor([[0.6, 0.8]]))
    assert index.tolist() == [1] and similarity.item() == pytest.approx(0.8)
    torch.testing.assert_close(bank.neighbours(torch.tensor([[1.0, 0.1]])), torch.tensor([[1.0, 0.0]]))


def test_sfnet_input_size_is_read_off_the_checkpoint():
    torch.manual_seed(0)
    network = SFNet(depths=(1, 1, 1, 1), channels=(4, 4, 4, 4), out_dim=8, input_size=64)
    from fastfair.faces.embed import sfnet_config_from_state

    config = sfnet_config_from_state(network.state_dict())
    assert config["input_size"] == 64 and config["depths"] == [1, 1, 1, 1]


def test_the_trainer_worlds_face_models_pass_a_gradient_to_the_images(tmp_path):
    """The tiny face embedder every trainer test with face_loss=True uses: faces embed apart and the face loss
    reaches the pixels (with dead ReLUs those tests could not see a face-loss gradient that went missing)."""
    from fastfair.testing import save_tiny_face_models

    weights, bank = save_tiny_face_models(tmp_path)
    embedder = load_face_embedder(str(weights))
    faces = (torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_()
    embeddings = embedder(faces)
    assert (embeddings[0] - embeddings[1]).abs().max() > 1e-3
    face_realism_loss(embeddings, FaceBank.load(str(bank))).sum().backward()
    assert faces.grad.abs().max() > 1e-4
