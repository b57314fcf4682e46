import math

import pytest

from fedgen.config import RunConfig, config_from_toml, config_to_toml, load_config, save_config
from fedgen.errors import FedgenError


def test_round_trip_through_toml_keeps_every_field_including_inf(tmp_path):
    config = load_config(None, {"privacy.epsilon": math.inf, "federation.rounds": 5, "modality": "both"})
    save_config(config, tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again == config
    assert math.isinf(again.privacy.epsilon) and not again.privacy.enabled
    assert again.modalities == ["image", "text"]
    assert config_from_toml(config_to_toml(config)) == config


def test_overrides_skip_none_and_nest():
    config = load_config(None, {"image.resolution": 16, "privacy.delta": None})
    assert config.image.resolution == 16
    assert config.privacy.delta is None


@pytest.mark.parametrize(
    "values, message",
    [
        ({"federation": {"rounds": 0}}, "federation.rounds"),
        ({"text": {"prompt_template": "{text}"}}, "needs a {label} slot"),
        ({"image": {"resolution": 32, "colour": 1}}, "image.colour"),
        ({"modality": "audio"}, "modality"),
        ({"privacy": {"max_grad_norm": 1.0}}, "per modality: image.max_grad_norm and text.max_grad_norm"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, values, message):
    import tomli_w

    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(values))
    with pytest.raises(FedgenError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_config(path)


def test_defaults_are_the_demo_consortium():
    config = RunConfig()
    assert config.data.image_classes[0] == "No_DR" and len(config.data.image_classes) == 5
    assert config.data.text_classes == ["Normal", "Anxiety", "Depression", "Stress", "Suicidal"]
