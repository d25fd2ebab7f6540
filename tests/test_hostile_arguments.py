"""Arguments that used to pass their checks and fail later: templates str.format cannot fill, TestTimeProLIP's."""

from __future__ import annotations

import re

import pytest
from conftest import TINY_MODELS, colour_images, edit_delta, tiny_adapter

from prolip import ProLIPAdapter
from prolip.errors import DeltaFileError, InputError
from prolip.model.backbone import build_backbone
from prolip.model.zeroshot import check_templates
from prolip.params import valid_template
from prolip.variants.test_time import TestTimeProLIP

BAD = ["a photo of a {} {x}.", "{} {0}", "{} {.__class__}", "{!r}", "{:>20}", "{0}", "{} }", "{{}}", "{}{}"]
GOOD = ["a photo of a {}.", "{}", "a {{curly}} {} photo", "{{{}}}"]


@pytest.mark.parametrize("template", BAD)
def test_templates_str_format_cannot_fill_are_refused_everywhere(template, checkpoints):
    assert not valid_template(template)
    with pytest.raises(InputError, match=re.escape("exactly one '{}' field")):
        check_templates([template])
    with pytest.raises(InputError, match=r"templates=.* is invalid"):
        tiny_adapter(checkpoints["vit"], templates=[template]).fit(*colour_images(1))
    backbone = build_backbone(TINY_MODELS["vit"], checkpoints["vit"], device="cpu")
    with pytest.raises(InputError, match=re.escape("exactly one '{}' field")):
        _ = TestTimeProLIP(backbone, ["red", "green"], templates=[template]).classes_  # checked when first used


@pytest.mark.parametrize("template", GOOD)
def test_literal_templates_with_escaped_braces_are_accepted(template):
    assert valid_template(template) and template.format("cat").count("cat") == 1


@pytest.mark.parametrize("where", ["templates", "hyperparameters"])
def test_a_delta_storing_such_a_template_is_refused_at_load(checkpoints, tmp_path, where):
    path = tmp_path / "d.safetensors"
    tiny_adapter(checkpoints["vit"], epochs=2).fit(*colour_images(1)).save(path)

    def config(c):
        if where == "templates":
            c["templates"] = ["{} {x}"]
        else:
            c["hyperparameters"]["templates"] = ["{} {x}"]

    bad = edit_delta(path, tmp_path / "bad.safetensors", config=config)
    with pytest.raises(DeltaFileError, match="templates"):
        ProLIPAdapter.load(bad, pretrained=checkpoints["vit"], verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size=0 is invalid"),
        ({"random_state": "x"}, "random_state='x' is invalid"),
        ({"random_state": None}, "random_state=None is invalid"),
        ({"chunk_size": 0}, "chunk_size=0 is invalid"),
        ({"class_names": []}, r"class_names=\[\] is invalid"),
        ({"class_names": "bag"}, "class_names='bag' is invalid"),
        ({"class_names": ["a", ""]}, "a non-empty list of distinct non-empty strings"),
    ],
)
def test_test_time_arguments_are_checked_before_any_work(checkpoints, kwargs, match):
    # As a scikit-learn estimator, the constructor only stores; the first use checks every argument.
    backbone = build_backbone(TINY_MODELS["vit"], checkpoints["vit"], device="cpu")
    estimator = TestTimeProLIP(backbone, **{"class_names": ["red", "green"], **kwargs})
    with pytest.raises(InputError, match=match):
        estimator.predict(colour_images(1)[0])
