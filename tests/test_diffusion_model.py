"""The class-conditioned diffusion model: architecture, loss, samplers, checkpoints, sheets, DP."""

import copy
import json
import re
import types

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

from fedgen.config import ImageConfig
from fedgen.errors import FedgenError
from fedgen.models.diffusion import (
    build_unet,
    contact_sheet,
    denoising_loss,
    load_image_model,
    make_noise_scheduler,
    make_sampler,
    null_class,
    predicted_noise,
    sample_images,
    save_image_model,
    to_uint8,
)
from fedgen.privacy.per_example_grads import per_example_grads

NUM_CLASSES = 3
CONFIG, WEIGHTS = "config.json", "diffusion_pytorch_model.safetensors"


def tiny_config(**overrides) -> ImageConfig:
    values = dict(resolution=16, block_out_channels=[16, 32], norm_num_groups=4)
    return ImageConfig(**(values | overrides))


@pytest.fixture
def config() -> ImageConfig:
    return tiny_config()


@pytest.fixture
def unet(config) -> UNet2DModel:
    torch.manual_seed(0)
    return build_unet(config, NUM_CLASSES)


def fixed_draws(config, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.channels, config.resolution, config.resolution)
    images = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(images.shape, generator=g)
    timesteps = torch.randint(0, config.train_timesteps, (batch,), generator=g)
    return images, noise, timesteps


# --- architecture -------------------------------------------------------------------------


def test_null_class_is_the_extra_embedding(unet):
    assert null_class(unet) == NUM_CLASSES
    assert unet.class_embedding.num_embeddings == NUM_CLASSES + 1


def test_attention_only_at_lowest_resolution():
    unet = build_unet(tiny_config(block_out_channels=[8, 16, 32]), NUM_CLASSES)
    assert unet.config.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D")
    assert unet.config.up_block_types == ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert unet.mid_block.attentions[0] is not None
    without = build_unet(tiny_config(attention=False), NUM_CLASSES)
    block_types = without.config.down_block_types + without.config.up_block_types
    assert not any("Attn" in name for name in block_types)
    assert without.mid_block.attentions[0] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(resolution=18, block_out_channels=[8, 8, 8]), "resolution 18 is not divisible by 4"),
        (dict(block_out_channels=[16, 30]), "[30] not divisible by image.norm_num_groups 4"),
        (dict(block_out_channels=[16, 20]), "multiple of the attention head size 8"),
    ],
)
def test_bad_sizes_are_named(overrides, message):
    with pytest.raises(FedgenError, match=re.escape(message)):
        build_unet(tiny_config(**overrides), NUM_CLASSES)


# --- loss ---------------------------------------------------------------------------------


def _velocity(scheduler, images, noise, timesteps):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0, written out (Salimans & Ho 2022, eq. 9)."""
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return abar.sqrt() * noise - (1 - abar).sqrt() * images


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_per_example_and_independent_of_the_batch(unet, prediction_type):
    config = tiny_config(prediction_type=prediction_type)
    scheduler = make_noise_scheduler(config)
    images, noise, timesteps = fixed_draws(config, 4)
    labels = torch.tensor([0, 1, 2, 0])
    batch_loss = denoising_loss(unet, scheduler, images, labels, timesteps=timesteps, noise=noise)
    assert batch_loss.shape == (4,)
    one = slice(2, 3)
    alone = denoising_loss(unet, scheduler, images[one], labels[one], timesteps=timesteps[one], noise=noise[one])
    noisy = scheduler.add_noise(images[one], noise[one], timesteps[one])
    predicted = unet(noisy, timesteps[one], class_labels=labels[one]).sample
    target = (
        noise[one] if prediction_type == "epsilon" else _velocity(scheduler, images[one], noise[one], timesteps[one])
    )
    manual = ((predicted - target) ** 2).mean()
    torch.testing.assert_close(batch_loss[2], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[0], manual, rtol=1e-5, atol=1e-6)


def test_a_perfect_v_prediction_implies_the_true_noise(config):
    assert config.prediction_type == "v_prediction"  # the default
    scheduler = make_noise_scheduler(config)
    images, noise, timesteps = fixed_draws(config, 6)
    noisy = scheduler.add_noise(images, noise, timesteps)
    recovered = predicted_noise(scheduler, _velocity(scheduler, images, noise, timesteps), noisy, timesteps)
    torch.testing.assert_close(recovered, noise, rtol=1e-4, atol=1e-4)


def test_label_dropout_one_equals_the_null_class(unet, config):
    scheduler = make_noise_scheduler(config)
    images, _, _ = fixed_draws(config, 4)
    labels = torch.tensor([0, 1, 2, 1])
    nulls = torch.full_like(labels, null_class(unet))

    def loss(labels, drop):  # same seed: same noise and timesteps (they are drawn first)
        g = torch.Generator().manual_seed(7)
        return denoising_loss(unet, scheduler, images, labels, cond_drop_prob=drop, generator=g)

    torch.testing.assert_close(loss(labels, 1.0), loss(nulls, 0.0))
    assert not torch.allclose(loss(labels, 0.0), loss(nulls, 0.0))  # the label does matter


# --- samplers -----------------------------------------------------------------------------


class ExactNoisePredictor(torch.nn.Module):
    """Knows the data: every class c is the constant image x0[c]; the null class is x0[-1].

    Its epsilon (or v) is exact, so a correct sampler must return exactly the class image, and
    guidance w must return uncond + w (cond - uncond) (both are affine in x0 at a fixed x_t).
    """

    def __init__(self, config, x0):
        super().__init__()
        self.x0 = torch.tensor(x0)
        self.config = types.SimpleNamespace(num_class_embeds=len(x0))
        self.device = torch.device("cpu")
        self.alphas_cumprod = make_noise_scheduler(config).alphas_cumprod
        self.prediction_type = config.prediction_type

    def forward(self, sample, timestep, class_labels):
        alpha = self.alphas_cumprod[timestep]
        x0 = self.x0[class_labels].view(-1, 1, 1, 1)
        eps = (sample - alpha.sqrt() * x0) / (1 - alpha).sqrt()
        if self.prediction_type == "v_prediction":
            return types.SimpleNamespace(sample=alpha.sqrt() * eps - (1 - alpha).sqrt() * x0)
        return types.SimpleNamespace(sample=eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(
    ("sampler", "steps"),
    [("ddim", 10), ("dpm", 10), ("dpm-sde", 10), ("ddpm", 10), pytest.param("ddpm", 1000, marks=pytest.mark.slow)],
)
def test_samplers_recover_the_data_from_exact_noise(sampler, steps, prediction_type):
    config = tiny_config(prediction_type=prediction_type)
    model = ExactNoisePredictor(config, [-1.0, 0.5, 0.0])
    out = sample_images(
        model,
        torch.tensor([0, 1, 0]),
        config=config,
        steps=steps,
        guidance=1.0,
        sampler=sampler,
        generator=torch.Generator().manual_seed(0),
    )
    expected = torch.tensor([-1.0, 0.5, -1.0]).view(-1, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_guidance_mixes_conditional_and_unconditional(config):
    model = ExactNoisePredictor(config, [0.8, 0.0])  # class 0 -> 0.8, null -> 0.0
    out = sample_images(model, torch.tensor([0]), config=config, steps=10, guidance=0.25)
    torch.testing.assert_close(out, torch.full_like(out, 0.25 * 0.8), atol=1e-4, rtol=0)


def test_sample_images_shapes_range_progress_and_mode(unet, config):
    finished = []
    unet.train()
    out = sample_images(
        unet,
        torch.tensor([0, 1, 2, 0, 1]),
        config=config,
        steps=3,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        progress=finished.append,
    )
    assert out.shape == (5, 1, 16, 16)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0
    assert finished == [2, 2, 1]
    assert unet.training and not out.requires_grad


def test_sampling_is_reproducible_with_a_generator(unet, config):
    def draw():
        generator = torch.Generator().manual_seed(3)
        return sample_images(unet, torch.tensor([0, 1]), config=config, steps=2, generator=generator)

    torch.testing.assert_close(draw(), draw(), rtol=0, atol=0)


def test_sampling_defaults_to_the_configs_sampler(unet, config):
    def draw(image_config, **sampler):
        return sample_images(
            unet,
            torch.tensor([0, 1]),
            config=image_config,
            steps=3,
            generator=torch.Generator().manual_seed(3),
            **sampler,
        )

    ddim_config = config.model_copy(update={"sampler": "ddim"})
    assert config.sampler == "dpm-sde"
    torch.testing.assert_close(draw(ddim_config), draw(config, sampler="ddim"), rtol=0, atol=0)
    torch.testing.assert_close(draw(config), draw(ddim_config, sampler="dpm-sde"), rtol=0, atol=0)
    assert not torch.allclose(draw(config), draw(ddim_config))


def test_make_sampler_kinds(config):
    ddim = make_sampler(config, "ddim")
    ddim.set_timesteps(10)
    assert isinstance(ddim, DDIMScheduler) and ddim.timesteps[0] == config.train_timesteps - 1
    for kind, algorithm in [("dpm", "dpmsolver++"), ("dpm-sde", "sde-dpmsolver++")]:
        dpm = make_sampler(config, kind)
        assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.algorithm_type == algorithm
    ddpm = make_sampler(config, "ddpm")
    assert isinstance(ddpm, DDPMScheduler)
    assert ddpm.config.num_train_timesteps == config.train_timesteps
    with pytest.raises(FedgenError, match="unknown sampler 'euler'"):
        make_sampler(config, "euler")
    with pytest.raises(FedgenError, match="sampling steps 1001"):
        sample_images(build_unet(config, 1), torch.tensor([0]), config=config, steps=1001)


# --- checkpoints --------------------------------------------------------------------------


def outputs(model, config):
    """Eval-mode outputs: from_pretrained returns an eval model, and CPU convs round by mode."""
    images, _, timesteps = fixed_draws(config, 2)
    model.eval()
    with torch.no_grad():
        return model(images, timesteps, class_labels=torch.tensor([0, 2])).sample


def test_save_load_round_trip(unet, config, tmp_path):
    target = tmp_path / "round-001" / "image"
    save_image_model(unet, target)
    save_image_model(unet, target)  # overwriting leaves no staging folders behind
    assert sorted(p.name for p in target.iterdir()) == [CONFIG, WEIGHTS]
    assert [p.name for p in target.parent.iterdir()] == ["image"]
    loaded = load_image_model(target)
    assert null_class(loaded) == NUM_CLASSES
    torch.testing.assert_close(outputs(loaded, config), outputs(unet, config), rtol=0, atol=0)
    by_diffusers = UNet2DModel.from_pretrained(target)  # diffusers' own API reads it too
    torch.testing.assert_close(outputs(by_diffusers, config), outputs(unet, config), rtol=0, atol=0)


def test_load_errors_are_one_line(unet, tmp_path):
    with pytest.raises(FedgenError, match="image model directory not found"):
        load_image_model(tmp_path / "nope")
    save_image_model(unet, tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(FedgenError) as err:
        load_image_model(tmp_path / "m")
    assert str(err.value) == (
        f"image model weights {weights} are corrupt or truncated: "
        "Error while deserializing header: incomplete metadata, file not fully covered"
    )
    weights.unlink()
    with pytest.raises(FedgenError, match=f"{WEIGHTS} is missing"):
        load_image_model(tmp_path / "m")


def test_load_refuses_weights_that_lack_tensors(unet, tmp_path):
    """diffusers would only warn and leave the class embedding random."""
    save_image_model(unet, tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS
    tensors = load_file(weights)
    del tensors["class_embedding.weight"]
    save_file(tensors, weights)
    with pytest.raises(FedgenError, match="lack 1 tensors of config.json, e.g. class_embedding"):
        load_image_model(tmp_path / "m")


def test_load_rejects_a_config_that_does_not_fit_the_weights(unet, tmp_path):
    save_image_model(unet, tmp_path / "m")
    config_file = tmp_path / "m" / CONFIG
    values = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(values | {"block_out_channels": [16, 48]}))
    bad_config = r"config.json cannot build the saved UNet: .*expected shape"
    with pytest.raises(FedgenError, match=bad_config) as err:
        load_image_model(tmp_path / "m")
    assert "\n" not in str(err.value)
    config_file.write_text("{")
    with pytest.raises(FedgenError, match="config.json is not valid JSON"):
        load_image_model(tmp_path / "m")


# --- pictures -----------------------------------------------------------------------------


def test_to_uint8_maps_the_range_to_bytes():
    images = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    pixels = to_uint8(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 2, 2, 1)
    assert pixels.ravel().tolist() == [0, 128, 255, 255]


def test_contact_sheet_has_one_column_per_class():
    black, white = -torch.ones(3, 1, 8, 8), torch.ones(2, 1, 8, 8)
    sheet = np.asarray(contact_sheet({"A": black, "B": white}, pad=2))
    header = sheet.shape[0] - 3 * (8 + 2)  # three rows (the longest column) under the header
    assert header > 2 and sheet[:header].max() > 200  # names are drawn (antialiased)
    column_width = (sheet.shape[1] - 2) // 2 - 2

    def centre(col, row):
        return sheet[header + row * 10 + 4, 2 + col * (column_width + 2) + column_width // 2]

    assert [centre(0, 0), centre(0, 2), centre(1, 0), centre(1, 1)] == [0, 0, 255, 255]
    assert centre(1, 2) == 0  # column B has only two samples: background below them


# --- learning and DP ----------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Two intra-op threads on a shared 2-core machine can be 20x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_model_learns_the_class(one_thread):
    """Black (class 0) vs white (class 1) images: guided samples must follow the label."""
    config = tiny_config(resolution=8, attention=False)
    torch.manual_seed(0)
    unet = build_unet(config, num_classes=2)
    scheduler = make_noise_scheduler(config)
    labels = torch.arange(64) % 2
    images = (2.0 * labels - 1).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    optimizer = torch.optim.Adam(unet.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = denoising_loss(unet, scheduler, images, labels, cond_drop_prob=0.1, generator=generator)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    samples = sample_images(
        unet,
        torch.tensor([0] * 8 + [1] * 8),
        config=config,
        steps=20,
        guidance=2.0,
        generator=torch.Generator().manual_seed(1),
    )
    black, white = samples[:8].mean(), samples[8:].mean()
    # untrained, or trained with every label dropped: |white - black| < 0.3; trained: ~0.9
    assert white - black > 0.5, (black, white)


def test_per_example_hooks_give_exact_per_sample_grads(unet, config):
    """Every trainable tensor gets a per-sample gradient equal to that example's own gradient,
    from the hooks DP training uses (with fedgen's Conv2d grad sampler: Opacus' own gave zeros
    for the convs after an attention block)."""
    images, noise, timesteps = fixed_draws(config, 4)
    labels = torch.tensor([0, 1, 2, 3])  # 3 is the null class: its embedding trains too
    reference = copy.deepcopy(unet)
    scheduler = make_noise_scheduler(config)
    with per_example_grads(unet):
        denoising_loss(unet, scheduler, images, labels, timesteps=timesteps, noise=noise).sum().backward()
    one = slice(1, 2)
    denoising_loss(
        reference, scheduler, images[one], labels[one], timesteps=timesteps[one], noise=noise[one]
    ).sum().backward()
    trainable = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 4 for _, p in trainable)
    expected = dict(reference.named_parameters())
    for name, p in trainable:
        reference_grad = expected[name].grad
        torch.testing.assert_close(p.grad_sample[1], reference_grad, rtol=1e-3, atol=1e-5)
