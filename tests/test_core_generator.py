import copy

import pytest
import torch

from hywu_nodes.core import (Condition, GeneratorConfig, HYWUGenerator, build_target_spec, condition_statistics, describe,
                             lora_patched, merge_lora_, without_shared)
from tiny_models import COND_SPEC, flux_inputs, make_condition, make_generator, tiny_flux, tiny_unet, unet_inputs

def base_params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family,build,inputs", [("sd15_ip2p", tiny_unet, unet_inputs), ("flux_kontext", tiny_flux, flux_inputs)])
def test_zero_init_b_leaves_base_output_unchanged(family, build, inputs):
    model = build()
    gen = make_generator(model, family)
    lora = gen.generate(make_condition(2))
    assert all(not b.any() for _, b in lora.weights.values())
    assert any(a.abs().sum() > 0 for a, _ in lora.weights.values())
    x = inputs(2)
    with torch.no_grad():
        ref = model(**x)[0]
        with lora_patched(model, lora):
            out = model(**x)[0]
    assert torch.equal(out, ref)


def test_optimizer_step_trains_generator_only():
    unet = tiny_unet()
    for p in unet.parameters():
        p.requires_grad_(False)
    before = base_params(unet)
    gen = make_generator(unet, "sd15_ip2p")
    gen_before = {k: v.detach().clone() for k, v in gen.state_dict().items()}
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-3)
    x = unet_inputs(2)
    for _ in range(3):  # step 1 moves the zero B head; afterwards gradients reach every block
        with lora_patched(unet, gen.generate(make_condition(2))):
            loss = unet(**x).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in gen.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
    after = gen.state_dict()
    changed = [k for k in gen_before if not torch.equal(gen_before[k], after[k])]
    assert "head_b.weight" in changed and any(k.startswith("blocks.0.") for k in changed) and "layer_embed" in changed
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in unet.parameters())


def test_samples_are_independent():
    unet = tiny_unet()
    gen = make_generator(unet, "sd15_ip2p", nonzero_b=True).eval()
    c1, c2 = make_condition(3, seed=0), make_condition(3, seed=0)
    c2.tokens["text"][2] += 1.0
    c2.tokens["image"][2] -= 1.0
    x = unet_inputs(3)
    with torch.no_grad():
        l1, l2 = gen.generate(c1), gen.generate(c2)
        with lora_patched(unet, l1):
            o1 = unet(**x).sample
        with lora_patched(unet, l2):
            o2 = unet(**x).sample
    for name, (a, b) in l1.weights.items():
        a2, b2 = l2.weights[name]
        torch.testing.assert_close(a2[:2], a[:2], rtol=0, atol=1e-6)
        torch.testing.assert_close(b2[:2], b[:2], rtol=0, atol=1e-6)
    assert not torch.allclose(l2.weights[name][1][2], b[2])
    torch.testing.assert_close(o2[:2], o1[:2], rtol=0, atol=1e-5)
    assert (o2[2] - o1[2]).abs().max() > 1e-4


def test_functional_lora_equals_merged_weights():
    unet = tiny_unet()
    gen = make_generator(unet, "sd15_ip2p", nonzero_b=True).eval()
    x = unet_inputs(1)
    with torch.no_grad():
        lora = gen.generate(make_condition(1))
        base = unet(**x).sample
        with lora_patched(unet, lora, strength=0.7):
            functional = unet(**x).sample
        merged = merge_lora_(copy.deepcopy(unet), lora, strength=0.7)(**x).sample
    assert (functional - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(functional, merged, rtol=1e-4, atol=1e-5)


def test_cfg_duplicated_batch_uses_each_samples_lora():
    unet = tiny_unet()
    gen = make_generator(unet, "sd15_ip2p", nonzero_b=True).eval()
    x = unet_inputs(2)
    doubled = {k: torch.cat([v, v]) if k != "encoder_hidden_states" else torch.cat([torch.zeros_like(v), v]) for k, v in x.items()}
    with torch.no_grad():
        lora = gen.generate(make_condition(2))
        with lora_patched(unet, lora):
            out = unet(**doubled).sample  # [uncond0, uncond1, cond0, cond1]
        for i in range(2):
            single = {k: v[[i, i + 2]] for k, v in doubled.items()}
            with lora_patched(unet, lora.select(i)):
                ref = unet(**single).sample
            torch.testing.assert_close(out[[i, i + 2]], ref, rtol=1e-4, atol=1e-5)
        explicit = torch.tensor([1, 0, 1, 0])  # an explicit sample -> LoRA map
        with lora_patched(unet, lora, sample_to_lora=explicit):
            swapped = unet(**doubled).sample
    with lora_patched(unet, lora.select(1)), torch.no_grad():
        ref0 = unet(**{k: v[[0]] for k, v in doubled.items()}).sample
    torch.testing.assert_close(swapped[[0]], ref0, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide"), lora_patched(unet, lora):
        unet(**unet_inputs(3))


def test_same_seed_same_lora_and_checkpointing_matches():
    unet = tiny_unet()
    cond = make_condition(2)
    g1 = make_generator(unet, "sd15_ip2p", seed=3, nonzero_b=True)
    g2 = make_generator(unet, "sd15_ip2p", seed=3, nonzero_b=True, gradient_checkpointing=True)
    t1, t2 = g1.tokens(cond), g2.tokens(cond)
    assert torch.equal(t1, t2)
    t1.square().sum().backward()
    t2.square().sum().backward()
    for (n, p1), (_, p2) in zip(g1.named_parameters(), g2.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-3, msg=n)  # summation order differs
    assert not torch.equal(make_generator(unet, "sd15_ip2p", seed=4, nonzero_b=True).tokens(cond), t1)


def test_condition_errors_are_clear():
    gen = make_generator(tiny_unet(), "sd15_ip2p")
    cond = make_condition(2)
    with pytest.raises(ValueError, match="missing source"):
        gen(Condition({"text": cond.tokens["text"]}))
    with pytest.raises(ValueError, match=r"expects \(batch, tokens, 16\)"):
        gen(Condition({"text": cond.tokens["text"], "image": torch.randn(2, 16, 8)}))
    with pytest.raises(ValueError, match="different batch sizes"):
        gen(Condition({"text": cond.tokens["text"], "image": torch.randn(3, 16, 16)}))


def test_describe_matches_a_real_generator():
    unet = tiny_unet()
    spec = build_target_spec(unet, "sd15_ip2p")
    cfg = GeneratorConfig.from_preset("tiny", rank=4)
    info = describe(cfg, spec, COND_SPEC)
    gen = HYWUGenerator(cfg, spec, COND_SPEC)
    assert info["generator_parameters"] == sum(p.numel() for p in gen.parameters())
    assert info["generated_elements"] == sum(a[0].numel() + b[0].numel() for a, b in gen.generate(make_condition(1)).weights.values())
    assert info["parameter_tokens"] == int(gen.slot_mask.sum())
    with pytest.raises(ValueError, match="unknown generator preset"):
        GeneratorConfig.from_preset("huge")


# --- options that make the generator use the request (condition_norm, shared_rank, film, masks) ---

OPTIONS = dict(condition_norm="token", shared_rank=2, film=True)


def test_options_keep_the_zero_start_and_train_their_parts():
    unet = tiny_unet()
    gen = make_generator(unet, "sd15_ip2p", **OPTIONS)
    lora = gen(make_condition(2))
    assert lora.rank == 4 + 2  # generated rank + shared rank, concatenated
    assert all(not b.any() for _, b in lora.weights.values())  # still the base exactly
    opt = torch.optim.AdamW(gen.parameters(), lr=1e-2)
    before = {k: v.detach().clone() for k, v in gen.state_dict().items()}
    for _ in range(3):
        with lora_patched(unet, gen(make_condition(2))):
            loss = unet(**unet_inputs(2)).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {k for k, v in gen.state_dict().items() if not torch.equal(v, before[k])}
    assert {"shared_a.0", "shared_b.0", "film.2.weight", "head_b.weight"} <= changed
    assert not {k for k in changed if k.startswith("cond_mean") or k.startswith("cond_std")}  # statistics are buffers


def test_shared_part_is_the_same_for_every_request():
    gen = make_generator(tiny_unet(), "sd15_ip2p", nonzero_b=True, shared_rank=2)
    torch.nn.init.normal_(gen.shared_b[0], std=0.1)
    lora = gen(make_condition(3))
    a, b = next(iter(lora.weights.values()))
    assert torch.equal(a[0, 4:], a[2, 4:]) and torch.equal(b[0, :, 4:], b[1, :, 4:])  # shared ranks
    assert not torch.equal(b[0, :, :4], b[2, :, :4])  # generated ranks differ per request
    # without_shared: the generated ranks alone (a chain's later edits), same scale; rank 0 is a no-op
    part = without_shared(lora, gen.config.shared_rank)
    assert part.rank == 4 and part.scale == lora.scale
    for k, (pa, pb) in part.weights.items():
        assert torch.equal(pa, lora.weights[k][0][:, :4]) and torch.equal(pb, lora.weights[k][1][:, :, :4])
    assert without_shared(lora, 0) is lora
    with pytest.raises(ValueError, match="no generated part"):
        without_shared(part, 4)


def test_condition_statistics_and_standardisation():
    conds = [make_condition(4, seed=s) for s in range(3)]
    for c in conds:
        c.tokens["text"][:, :, 0] += 5.0  # a component every prompt shares
    stats = condition_statistics(conds, COND_SPEC, "token")
    mean, std = stats["text"]
    assert mean.shape == std.shape == (12, 32)
    text = torch.cat([c.tokens["text"] for c in conds])
    real = torch.cat([c.mask("text") for c in conds])[0]  # the same 9 real tokens in every row
    torch.testing.assert_close(mean[:9].double(), text[:, :9].double().mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std[:9].double(), text[:, :9].double().std(0, unbiased=False), rtol=1e-4, atol=1e-5)
    assert real[:9].all() and not real[9:].any()
    assert torch.equal(mean[9:], torch.zeros(3, 32))  # never-seen (masked) positions: no shift
    feature = condition_statistics(conds, COND_SPEC, "feature")["text"][0]
    assert feature.shape == (1, 32) and abs(feature[0, 0].item() - 5.0) < 0.5
    # the generator sees (x - mean) / std: equal to a plain generator fed the standardised tokens
    gen = make_generator(tiny_unet(), "sd15_ip2p", nonzero_b=True, condition_norm="token")
    gen.set_condition_stats(stats)
    plain = make_generator(tiny_unet(), "sd15_ip2p", nonzero_b=True)
    plain.load_state_dict({k: v for k, v in gen.state_dict().items() if not k.startswith(("cond_mean", "cond_std"))})
    c = conds[0]
    z = Condition({n: (t - stats[n][0][: t.shape[1]]) / stats[n][1][: t.shape[1]] for n, t in c.tokens.items()}, c.masks)
    torch.testing.assert_close(gen.tokens(c), plain.tokens(z), rtol=1e-5, atol=1e-6)


def test_padding_mask_hides_the_padding():
    from hywu_nodes.core import ConditionSource, ConditionSpec, prompt_mask

    ids = torch.tensor([[49406, 5, 6, 49407, 49407, 49407], [49406, 5, 6, 7, 8, 9]])
    assert prompt_mask(ids, 49407).tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    spec = ConditionSpec((ConditionSource("text", "text_hidden_states", 32, 12, {"mask": "padding"}),
                          ConditionSource("image", "vae_latent_patches", 16, 16)))
    gen = HYWUGenerator(GeneratorConfig.from_preset("tiny", rank=4), build_target_spec(tiny_unet(), "sd15_ip2p"), spec)
    torch.nn.init.normal_(gen.head_b.weight, std=0.05)
    c = make_condition(1)
    noisy = Condition({"text": c.tokens["text"].clone(), "image": c.tokens["image"]}, c.masks)
    noisy.tokens["text"][:, 9:] += 3.0  # only the masked padding changes
    torch.testing.assert_close(gen.tokens(c), gen.tokens(noisy))
    with pytest.raises(ValueError, match="no padding mask"):
        gen(Condition(c.tokens))
    with pytest.raises(ValueError, match="mask must be"):
        ConditionSource("text", "text_hidden_states", 32, 12, {"mask": "yes"})
    with pytest.raises(ValueError, match="negative int"):
        ConditionSource("text", "text_hidden_states", 32, 12, {"layer": 3})


def test_condition_cat_pads_masked_sources_and_refuses_unmasked_ones():
    """Condition.cat (the trainer's extra distillation rows join the batch in one generator call)."""
    a = Condition({"text": torch.randn(2, 3, 4), "image": torch.randn(2, 5, 4)}, {"text": torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()})
    b = Condition({"text": torch.randn(1, 2, 4), "image": torch.randn(1, 5, 4)}, {"text": torch.tensor([[1, 0]]).bool()})
    c = Condition.cat([a, b])
    assert c.batch_size == 3 and c.tokens["text"].shape == (3, 3, 4) and "image" not in c.masks
    assert torch.equal(c.tokens["text"][:2], a.tokens["text"]) and torch.equal(c.tokens["text"][2, :2], b.tokens["text"][0])
    assert c.tokens["text"][2, 2].abs().sum() == 0 and c.masks["text"][2].tolist() == [True, False, False]
    assert torch.equal(c.tokens["image"], torch.cat([a.tokens["image"], b.tokens["image"]]))
    with pytest.raises(ValueError, match="'image'.*no padding mask"):
        Condition.cat([a, Condition({"text": b.tokens["text"], "image": torch.randn(1, 4, 4)}, b.masks)])


def test_concat_ranks_sums_the_updates_and_refuses_mixed_scales():
    from hywu_nodes.core import GeneratedLoRA, concat_ranks

    g = torch.Generator().manual_seed(0)
    one, two = (GeneratedLoRA({"l": (torch.randn(2, r, 5, generator=g), torch.randn(2, 4, r, generator=g))}, 0.5)
                for r in (3, 2))
    both = concat_ranks([one, two])
    a, b = both.weights["l"]
    assert both.rank == 5 and both.scale == 0.5
    want = sum(lo.weights["l"][1] @ lo.weights["l"][0] for lo in (one, two))
    assert torch.allclose(b @ a, want, atol=1e-5)
    with pytest.raises(ValueError, match="one alpha / rank"):
        concat_ranks([one, GeneratedLoRA(two.weights, 1.0)])
