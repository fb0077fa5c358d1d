import pytest

from cascade_rcnn.config import (
    COCO_CLASSES,
    ModelConfig,
    config_from_dict,
    config_to_dict,
    get_preset,
    with_overrides,
)
from cascade_rcnn.errors import ConfigError


def test_defaults_follow_mmdetection():
    cfg = get_preset("cascade_rcnn_r50_fpn")
    assert cfg.cascade.stage_ious == (0.5, 0.6, 0.7)
    assert cfg.cascade.stage_loss_weights == (1.0, 0.5, 0.25)
    assert cfg.cascade.class_agnostic and cfg.cascade.score_ensemble == "mean_logits"
    assert cfg.roi_align.aligned and cfg.anchors.center_offset == 0.0 and not cfg.box_coder.plus_one
    assert (cfg.transform.min_size, cfg.transform.max_size) == (800, 1333)
    assert cfg.class_names == COCO_CLASSES and len(COCO_CLASSES) == 80


def test_dotted_overrides_and_unknown_keys():
    cfg = get_preset("cascade_rcnn_r101_fpn", **{"rpn.nms_thresh": 0.6, "num_classes": 2})
    assert cfg.rpn.nms_thresh == 0.6 and cfg.backbone.depth == 101
    assert cfg.num_classes == 2 and cfg.class_names is None and cfg.names == ("class_0", "class_1")
    with pytest.raises(ConfigError, match="rpn.nms_thresold"):
        get_preset("cascade_rcnn_r50_fpn", **{"rpn.nms_thresold": 0.6})
    with pytest.raises(ConfigError, match="no_such_preset"):
        get_preset("no_such_preset")
    with pytest.raises(ConfigError, match="class_names"):
        with_overrides(ModelConfig(), {"num_classes": 2, "class_names": ("a",)})


def test_dict_round_trip_and_unknown_key_names_the_key():
    cfg = get_preset("cascade_rcnn_r50_fpn", num_classes=2, class_names=("cat", "dog"))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    data = config_to_dict(cfg)
    data["cascade"]["stage_iou"] = [0.5]
    with pytest.raises(ConfigError, match="cascade.stage_iou"):
        config_from_dict(data)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rpn.nms_thresh", "high", "rpn.nms_thresh"),
        ("cascade.score_ensemble", "max", "cascade.score_ensemble"),
        ("cascade.stage_stds", [[0.1, 0.1, 0.2]], r"cascade.stage_stds\[0\]"),
        ("num_classes", True, "num_classes"),
        ("transform.min_size", 800.5, "transform.min_size"),
    ],
)
def test_wrong_types_name_the_key(key, value, message):
    data = config_to_dict(get_preset("cascade_rcnn_r50_fpn"))
    head, _, tail = key.partition(".")
    if tail:
        data[head][tail] = value
    else:
        data[head] = value
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)
    with pytest.raises(ConfigError, match=message):
        get_preset("cascade_rcnn_r50_fpn", **{key: value})


def test_lists_and_ints_are_accepted_where_tuples_and_floats_are_expected():
    cfg = get_preset("cascade_rcnn_r50_fpn", **{"cascade.stage_ious": [0.5, 0.6, 1], "rpn.nms_thresh": 1})
    assert cfg.cascade.stage_ious == (0.5, 0.6, 1.0) and isinstance(cfg.rpn.nms_thresh, float)


def test_every_preset_round_trips_through_a_dict():
    from cascade_rcnn.config import PRESETS

    for name in PRESETS:
        cfg = get_preset(name)
        assert config_from_dict(config_to_dict(cfg)) == cfg, name
