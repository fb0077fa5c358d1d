import numpy as np
import pytest
import torch
from PIL import Image

from cascade_rcnn import Detector
from cascade_rcnn.api import to_tensor_image
from cascade_rcnn.data.image_io import load_image
from cascade_rcnn.errors import CascadeRCNNError, CheckpointError
from tests.helpers import require_coco128, tiny_config


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return Detector(config=tiny_config(num_classes=3, **{"transform.min_size": 160, "transform.max_size": 256}))


def assert_same(a, b, atol=1e-4):
    assert len(a) == len(b)
    torch.testing.assert_close(a.boxes, b.boxes, atol=atol, rtol=0)
    torch.testing.assert_close(a.scores, b.scores, atol=atol, rtol=0)
    assert torch.equal(a.labels, b.labels)


def test_accepts_paths_pil_numpy_tensors_and_gives_the_same_result(detector):
    root = require_coco128()
    path = root / "val2017" / "000000000139.jpg"
    array = load_image(path)
    by_path = detector.predict(path)
    assert len(by_path) > 0
    assert_same(by_path, detector.predict(str(path)))
    assert_same(by_path, detector.predict(Image.fromarray(array)))
    assert_same(by_path, detector.predict(array))
    assert_same(by_path, detector.predict(torch.from_numpy(array).permute(2, 0, 1).float()))
    assert by_path.names and set(by_path.names) <= set(detector.class_names)


def test_batched_equals_one_by_one(detector):
    root = require_coco128()
    # 139 and 632 share their input size at this scale; 285 has another one.
    paths = [root / "val2017" / f"{i:012d}.jpg" for i in (139, 632, 285)]
    singles = [detector.predict(p) for p in paths]
    batched = detector.predict(paths, batch_size=3)
    assert isinstance(batched, list) and len(batched) == 3
    for s, b in zip(singles, batched):
        assert_same(s, b)


def test_predict_does_not_mutate_inputs(detector):
    g = torch.Generator().manual_seed(3)
    tensor = torch.rand(3, 100, 140, generator=g) * 255
    array = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    tensor_copy, array_copy = tensor.clone(), array.copy()
    detector.predict([tensor, array], batch_size=2)
    assert torch.equal(tensor, tensor_copy) and np.array_equal(array, array_copy)


def test_outputs_in_original_image_coordinates(detector):
    """The same network input reached from the original image and from a copy already at the network's input size
    must give boxes that differ exactly by the two axes' scale factors."""
    root = require_coco128()
    transform = detector.model.transform
    for name in ("000000000139.jpg", "000000000285.jpg", "000000000724.jpg"):  # landscape, near-square, portrait
        original = to_tensor_image(root / "val2017" / name)
        h, w = original.shape[-2:]
        resized = transform.resize(original)
        new_h, new_w = resized.shape[-2:]
        det_original = detector.predict(original)
        det_resized = detector.predict(resized)
        assert len(det_original) > 0
        scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
        torch.testing.assert_close(det_original.boxes * scale, det_resized.boxes, atol=2e-3, rtol=1e-5)
        assert (det_original.boxes[:, 0::2] <= w + 1e-3).all() and (det_original.boxes[:, 1::2] <= h + 1e-3).all()
        assert (det_original.boxes >= 0).all()


def test_safetensors_round_trip(detector, tmp_path):
    path = detector.save(tmp_path / "model.safetensors")
    loaded = Detector.from_weights(path)
    assert loaded.config == detector.config
    assert loaded.class_names == detector.class_names
    assert not loaded.load_report.missing and not loaded.load_report.unexpected
    for (name, a), (_, b) in zip(detector.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    image = torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(5)) * 255
    assert_same(detector.predict(image), loaded.predict(image), atol=0)


def test_loaded_model_owns_its_weights(detector, tmp_path):
    """from_weights builds on the meta device and takes the checkpoint's tensors: every tensor ends up real, on the
    CPU, frozen stages stay frozen, and the weights do not depend on the file afterwards (overwritten in place)."""
    path = detector.save(tmp_path / "model.safetensors")
    loaded = Detector.from_weights(path)
    tensors = dict(loaded.model.named_parameters()) | dict(loaded.model.named_buffers())
    assert not any(t.is_meta for t in tensors.values()) and {t.device.type for t in tensors.values()} == {"cpu"}
    assert len(loaded.model.rpn.anchor_generator.base_anchors) == 5
    assert all(a.device.type == "cpu" for a in loaded.model.rpn.anchor_generator.base_anchors)
    grads = {n: p.requires_grad for n, p in detector.model.named_parameters()}
    assert {n: p.requires_grad for n, p in loaded.model.named_parameters()} == grads
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    size = path.stat().st_size
    with open(path, "r+b") as f:  # in place: same inode, every byte after the header zeroed
        f.seek(4096)
        f.write(b"\x00" * (size - 4096))
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_errors_are_clear(tmp_path):
    with pytest.raises(CascadeRCNNError, match="no-such-file"):
        Detector.from_weights(tmp_path / "no-such-file.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.bin"):
        Detector.from_weights(junk)


def test_bad_array_shapes_are_rejected(detector):
    with pytest.raises(CascadeRCNNError, match="shape"):
        detector.predict(np.zeros((4, 5, 6, 7), dtype=np.uint8))
    with pytest.raises(CascadeRCNNError, match="shape"):
        detector.predict(torch.zeros(1, 3, 10, 10))
