"""`HeadDesign`'s JSON form (`to_dict`, `from_dict`): the recipe's spelling, what
kgreedy.tune's tuning.json holds, read back as the same design."""

import json

import pytest

from kgreedy import heads
from kgreedy.config.designs import HeadDesign


@pytest.mark.parametrize("design", [
    HeadDesign("conv", 2, 16, 2), HeadDesign("conv", 3, 4, 1, reduction=2),
    HeadDesign("mlp_sr", 1, "auto", 2), HeadDesign("linear", 1, 128, 4),
    heads.Linear(pool_size=2), heads.Vgg(), HeadDesign("model")])
def test_a_design_reads_back_from_its_json_form(design):
    plain = json.loads(json.dumps(design.to_dict()))
    assert HeadDesign.from_dict(plain) == design


def test_the_json_form_is_the_recipes_spelling_without_unset_fields():
    # tuning.json's designs, as the tuner has always written them.
    assert HeadDesign("conv", 2, 16, 2).to_dict() == {"head": "conv", "k": 2, "width": 16,
                                                      "pool_size": 2}
    assert list(HeadDesign("mlp_sr", 1, "auto", 2, 4).to_dict()) == [
        "head", "k", "width", "pool_size", "reduction"]
    assert heads.Vgg().to_dict() == {"head": "vgg"}
    assert HeadDesign.from_dict({"head": "linear", "pool_size": 2}) == heads.Linear(2)


@pytest.mark.parametrize("values,match", [
    (None, "must be a dict"), ({"k": 2}, "with the key 'head'"),
    ({"kind": "conv", "k": 2, "width": 4, "pool_size": 1}, "with the key 'head'"),
    ({"head": "conv", "k": 2, "width": 4, "pool_size": 1, "depth": 3}, "Received: values="),
    ({"head": "conv", "k": 0, "width": 4, "pool_size": 1}, "`k` must be a positive"),
    ({"head": "conv", "k": 2, "pool_size": 1}, "`width` must be a positive"),
    ({"head": "mlp", "pool_size": 1}, "`kind` must be one of"),
])
def test_a_bad_json_form_is_refused(values, match):
    with pytest.raises(ValueError, match=match):
        HeadDesign.from_dict(values)
