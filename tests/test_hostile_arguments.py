"""Arguments that used to pass their checks and fail later: templates str.format cannot fill, TestTimeProLIP's."""

from __future__ import annotations

import json
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
        TestTimeProLIP(backbone, ["red", "green"], templates=[template])


@pytest.mark.parametrize("template", GOOD)
def test_literal_templates_with_escaped_braces_are_accepted(template):
    assert valid_template(template) and template.format("cat").count("cat") == 1


@pytest.mark.parametrize("where", ["templates", "hyperparameters"])
def test_a_delta_storing_such_a_template_is_refused_at_load(checkpoints, tmp_path, where):
    path = tmp_path / "d.safetensors"
    tiny_adapter(checkpoints["vit"], epochs=2).fit(*colour_images(1)).save(path)

    def meta(m):
        if where == "templates":
            m["templates"] = json.dumps(["{} {x}"])
        else:
            m["hyperparameters"] = json.dumps({**json.loads(m["hyperparameters"]), "templates": ["{} {x}"]})

    bad = edit_delta(path, tmp_path / "bad.safetensors", meta=meta)
    with pytest.raises(DeltaFileError, match="templates"):
        ProLIPAdapter.load(bad, pretrained=checkpoints["vit"], verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size=0 is invalid"),
        ({"random_state": "x"}, "random_state='x' is invalid"),
        ({"random_state": None}, "random_state=None is invalid"),
        ({"chunk_size": 0}, "chunk_size=0 is invalid"),
        ({"class_names": []}, r"class_names=\[\] must be"),
        ({"class_names": "bag"}, "class_names='bag' must be"),
        ({"class_names": ["a", ""]}, "must be a non-empty list of distinct non-empty strings"),
    ],
)
def test_test_time_arguments_are_checked_when_built(checkpoints, kwargs, match):
    backbone = build_backbone(TINY_MODELS["vit"], checkpoints["vit"], device="cpu")
    with pytest.raises(InputError, match=match):
        TestTimeProLIP(backbone, **{"class_names": ["red", "green"], **kwargs})
