"""The fast update (make_update) against the same update written plainly, on a fixed batch.

Plain: mu sampled one action dimension at a time with the state embedded for every sample (through the
teacher-forced logits), each Q network its own nn.Sequential on [s, a], one network at a time, its own loss."""

import io

import pytest
import torch
from conftest import make_update
from torch import nn

import behavior_model
import emaq_offline as eo
from behavior_model import BehaviorModel, fp32_output_layer

OBS, ACT, K, HIDDEN, B, N = 5, 3, 4, 64, 24, 6


def plain_sample(mu, obs, n, u):
    """Appendix B read literally: per state, per sample, per dimension; u = mu.sample's uniforms [2, B, n, D]."""
    actions = torch.zeros(len(obs), n, ACT)
    for b in range(len(obs)):
        for j in range(n):
            for i in range(ACT):  # head i only sees a[:i]: the later coordinates are still zero and masked anyway
                probs = torch.softmax(mu.logits(obs[b : b + 1], actions[b : b + 1, j])[0, i], -1)
                cdf = probs.cumsum(0)
                label = min(int(torch.searchsorted(cdf, u[0, b, j, i] * cdf[-1], right=True)), mu.num_bins - 1)
                actions[b, j, i] = mu.low[i] + (label + u[1, b, j, i]) * mu.bin_width[i]
    return actions.clamp(mu.low, mu.high)


def plain_member(q, k):
    """Member k of the stacked ensemble as an ordinary MLP on concat(s, a)."""
    layers = [nn.Linear(OBS + ACT, HIDDEN), nn.ReLU()]
    layers[0].weight.data = torch.cat([q.w_obs[k], q.w_act[k]]).T.clone()
    layers[0].bias.data = q.b_in[k, 0].clone()
    for w, b in zip(q.w_hidden, q.b_hidden, strict=False):
        layers += [nn.Linear(HIDDEN, HIDDEN), nn.ReLU()]
        layers[-2].weight.data, layers[-2].bias.data = w[k].T.clone(), b[k, 0].clone()
    layers.append(nn.Linear(HIDDEN, 1))
    layers[-1].weight.data, layers[-1].bias.data = q.w_out[k].T.clone(), q.b_out[k, 0].clone()
    return nn.Sequential(*layers)


def setup(seed=0):
    torch.manual_seed(seed)
    mu = BehaviorModel(
        OBS, [-1, 0, -2], [1, 2, 0], state_hidden=32, embed_dim=32, head_hidden=32, head_layers=2, num_bins=12
    )
    q = eo.QEnsemble(OBS, ACT, K, HIDDEN, layers=3)
    q_target = eo.QEnsemble(OBS, ACT, K, HIDDEN, layers=3).requires_grad_(False)
    data = {
        "obs": torch.randn(200, OBS),
        "actions": torch.rand(200, ACT) * 2 - 1,
        "rewards": torch.randn(200),
        "next_obs": torch.randn(200, OBS),
        "terminals": (torch.rand(200) < 0.2).float(),
    }
    return mu.requires_grad_(False), q, q_target, data


def plain_update(mu, q, q_target, data, args, seed):
    """(target, mean loss over members, first hidden layer's gradient per member), drawing the same random numbers."""
    torch.manual_seed(seed)
    idx = torch.randint(200, (B,))
    obs, actions, rewards, next_obs, terminals = (
        data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "terminals")
    )
    samples = plain_sample(mu, next_obs, N, torch.rand(2, B, N, ACT))  # the fast path values them in chunks of states
    targets, members = [plain_member(q_target, k) for k in range(K)], [plain_member(q, k) for k in range(K)]
    with torch.no_grad():
        pairs = torch.cat([next_obs.repeat_interleave(N, 0), samples.reshape(B * N, ACT)], 1)  # s' repeated per sample
        values = torch.stack([t(pairs).view(B, N) for t in targets]).min(0).values  # Ensemble, lambda = 1
        target = rewards + args.gamma * (1 - terminals) * values.max(1).values  # eq. 11
    losses, grads = [], []
    for member in members:
        loss = ((member(torch.cat([obs, actions], 1)).squeeze(1) - target) ** 2).mean()  # eq. 10, one network
        loss.backward()
        losses.append(loss.detach())
        grads.append(member[2].weight.grad.T)  # first hidden layer, as [in, out]
    return target, torch.stack(losses).mean(), torch.stack(grads)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fast_update_matches_the_plain_update(precision):
    """fp32: targets, loss, gradients and EMA'd targets agree within fp32 tolerance (1e-5 relative).
    bf16 (stated tolerance): the mean target within 0.5% (of its mean magnitude) and the loss within 1% of plain fp32
    update; measured on 5 seeds: at most 0.02% for both."""
    mu, q, q_target, data = setup()
    args = eo.Args(num_samples=N, num_qs=K, batch_size=B, precision=precision, compile="off", ema=0.9)
    chunk = 5  # 24 next states in chunks of 5: the last chunk is partial
    expected_target, expected_loss, expected_grads = plain_update(mu, q, q_target, data, args, seed=3)
    initial_target_q = [p.clone() for p in q_target.parameters()]

    update = make_update(data, mu, q, q_target, torch.optim.Adam(q.parameters(), lr=1e-3, fused=True), args, chunk)
    torch.manual_seed(3)
    metrics = update()
    target_mean, loss = metrics["target_values"], metrics["qf_loss"]
    scale = expected_target.abs().mean()
    if precision == "fp32":
        torch.testing.assert_close(target_mean, expected_target.mean(), rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(q.w_hidden[0].grad, expected_grads, rtol=1e-4, atol=1e-6)
        # the EMA of the stepped weights
        for p_t, p_0, p in zip(q_target.parameters(), initial_target_q, q.parameters(), strict=True):
            torch.testing.assert_close(p_t, args.ema * p_0 + (1 - args.ema) * p.detach())
    else:
        assert abs(target_mean - expected_target.mean()) < 0.005 * scale
        assert abs(loss - expected_loss) < 0.01 * expected_loss
        assert q.w_hidden[0].grad.dtype == torch.float32


def test_bf16_target_copies_follow_the_fp32_target_every_update():
    """In bf16 the target reads bf16 copies of mu and of the target ensemble; after updates they must equal fresh
    copies of the current fp32 target (which stays fp32: bf16 rounding would swallow the EMA's 0.5% steps)."""
    mu, q, q_target, data = setup()
    args = eo.Args(num_samples=N, num_qs=K, batch_size=B, precision="bf16", compile="off", ema=0.995)
    update = make_update(data, mu, q, q_target, torch.optim.Adam(q.parameters(), lr=1e-2), args, 8)
    before = q_target.w_hidden[0].clone()
    for _ in range(3):
        update()
    assert not torch.equal(before, q_target.w_hidden[0]) and q_target.w_hidden[0].dtype == torch.float32
    torch.manual_seed(5)
    idx = torch.randint(200, (B,))
    with eo.autocast("bf16", torch.device("cpu")):
        expected = eo.emaq_target(
            eo.bf16_copy(mu, eo.MU_OUTPUT),
            eo.bf16_copy(q_target, eo.Q_OUTPUT),
            data["rewards"][idx],
            data["next_obs"][idx],
            data["terminals"][idx],
            args,
            8,
        )
    torch.manual_seed(5)
    assert update()["target_values"] == expected.mean()


def test_compiled_update_equals_eager_and_failure_falls_back(monkeypatch, capsys):
    """--compile on (CPU, inductor): one update gives the eager update's metrics and weights. If compiling is
    impossible, the run continues eagerly with a one-line warning."""
    monkeypatch.setattr(
        torch._inductor.config, "fallback_random", True
    )  # eager's random streams: the same batch and samples
    results = []
    for compile_mode in ("off", "on"):
        mu, q, q_target, data = setup()
        args = eo.Args(num_samples=N, num_qs=K, batch_size=B, precision="fp32", compile=compile_mode, ema=0.9)
        update = make_update(data, mu, q, q_target, torch.optim.Adam(q.parameters(), lr=1e-3, fused=True), args, 8)
        torch.manual_seed(7)
        metrics = [update() for _ in range(2)][-1]
        results.append((metrics, [p.detach().clone() for p in q.parameters()]))
    (eager, eager_weights), (compiled, compiled_weights) = results
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_weights, eager_weights, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    def broken_compile(fn, **kwargs):
        def call():
            raise RuntimeError("Compiler: cc not found")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    mu, q, q_target, data = setup()
    args = eo.Args(num_samples=N, num_qs=K, batch_size=B, precision="fp32", compile="on", ema=0.995)
    before = q.w_out.detach().clone()
    metrics = make_update(data, mu, q, q_target, torch.optim.Adam(q.parameters(), lr=1e-3), args, 8)()
    assert torch.isfinite(metrics["qf_loss"]) and not torch.equal(before, q.w_out)  # the eager update ran
    assert "torch.compile failed (RuntimeError: Compiler: cc not found); continuing eagerly" in capsys.readouterr().err


def test_auto_settings_per_device(monkeypatch, capsys):
    resolved = eo.check_args(eo.Args(), torch.device("cpu"))
    with open("/proc/cpuinfo") as f:  # the CPU's flags: AVX512-BF16 or AMX do bf16 matmuls natively
        native = bool({"avx512_bf16", "amx_bf16"} & set(f.read().split()))
    assert (resolved.precision, resolved.compile, resolved.cudagraphs) == ("bf16" if native else "fp32", "off", "off")
    for flags, precision in [("fpu avx512f avx512_bf16", "bf16"), ("fpu amx_bf16", "bf16"), ("fpu avx512f", "fp32")]:
        monkeypatch.setattr(eo, "open", lambda *_, flags=flags: io.StringIO(f"flags\t\t: {flags}\n"), raising=False)
        assert eo.check_args(eo.Args(), torch.device("cpu")).precision == precision  # emulated bf16 would be slower
    monkeypatch.setattr(eo.os.path, "isfile", lambda path: False)  # no /proc/cpuinfo (not Linux): no native bf16
    assert eo.check_args(eo.Args(), torch.device("cpu")).precision == "fp32"
    assert eo.check_args(eo.Args(precision="bf16"), torch.device("cpu")).precision == "bf16"  # asked for: kept
    gpu = eo.check_args(eo.Args(precision="fp32"), torch.device("cuda"))
    assert (gpu.compile, gpu.cudagraphs) == ("on", "on")
    assert eo.check_args(eo.Args(precision="fp32", compile="off"), torch.device("cuda")).cudagraphs == "off"
    for bad, device, message in [
        (dict(cudagraphs="on"), "cpu", "--cudagraphs on replays the compiled update on a CUDA GPU: it needs"),
        (dict(precision="fp32", compile="off", cudagraphs="on"), "cuda", "it needs --compile on and a GPU"),
    ]:
        with pytest.raises(SystemExit):
            eo.check_args(eo.Args(**bad), torch.device(device))
        assert message in capsys.readouterr().err


def test_bf16_keeps_the_compared_values_in_fp32_at_q_around_1000():
    """HalfCheetah medium/expert data give Q of 500 to 1200, where bf16's spacing is 4 to 8. Under --precision bf16 the
    target's mean absolute difference from fp32's stays below 0.5, and wherever fp32's best two of N candidates differ
    by more than 1, bf16 picks the same one in at least 99% of states. Q's scale sits in the weights (the last hidden
    units around 1, the output weights summing to 1000: bf16 products must not round it). With the scale in the output
    bias instead, a layer that rounds x @ w to bf16 passed too (the bias is added in fp32): that case could not fail.
    (Measured: 0.11 and 100%; with bf16 Q outputs 0.98 and 58%.)"""
    torch.manual_seed(0)
    obs_dim, act_dim, k, n, batch = 17, 6, 4, 10, 1024
    mu = BehaviorModel.from_preset("table3", obs_dim, [-1.0] * act_dim, [1.0] * act_dim).requires_grad_(False)
    q = eo.QEnsemble(obs_dim, act_dim, k, 256, 3).requires_grad_(False)
    with torch.no_grad():  # Q around 1000, candidates a few apart: the scale of a converged HalfCheetah ensemble
        q.b_hidden[-1].add_(1.0)
        q.w_out.mul_(50.0).add_(1000 / 256)
        q.b_out.zero_()
    args = eo.Args(num_samples=n, num_qs=k)
    obs, next_obs, rewards, terminals = (
        torch.randn(batch, obs_dim),
        torch.randn(batch, obs_dim),
        torch.rand(batch) * 10,
        torch.zeros(batch),
    )
    candidates = mu.sample(obs, n)
    values32 = eo.ensemble(q(obs, candidates), 1.0)
    torch.manual_seed(1)
    target32 = eo.emaq_target(mu, q, rewards, next_obs, terminals, args)
    with eo.autocast(
        "bf16", torch.device("cpu")
    ):  # the bf16 path: read copies of mu and the target, as make_update uses
        mu16, q16 = eo.bf16_copy(mu, eo.MU_OUTPUT), eo.bf16_copy(q, eo.Q_OUTPUT)
        values16 = eo.ensemble(q16(obs, candidates), 1.0)
        torch.manual_seed(1)
        target16 = eo.emaq_target(mu16, q16, rewards, next_obs, terminals, args)
    assert 900 < values32.mean() < 1100 and values16.dtype == target16.dtype == torch.float32
    assert (target16 - target32).abs().mean() < 0.5
    best_two = values32.topk(2, -1).values
    clear = best_two[:, 0] - best_two[:, 1] > 1
    assert clear.sum() > 100
    assert (values16.argmax(-1) == values32.argmax(-1))[clear].float().mean() >= 0.99


@pytest.mark.parametrize("batched", [True, False], ids=["Q ensemble, mu's heads", "one head, the VAE"])
def test_fp32_output_layer_from_bf16_activations_equals_fp32_at_q_around_1000(batched):
    """Under bf16 on a CPU the output layers read the bf16 activations without an fp32 copy (two bf16 products: the
    result, then its rounding error). Values and gradients must equal fp32's computation on the same bf16 operands:
    values within 1e-5 x |Q| (a bf16 result is off by up to 4 at Q = 1000), gradients within 1% in norm (the incoming
    gradient is rounded to bf16, as in every bf16 layer's backward)."""
    torch.manual_seed(0)
    shape, affine = ((4, 640, 256), torch.baddbmm) if batched else ((640, 256), torch.addmm)
    x = torch.randn(shape).relu().to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(*shape[:-2], 256, 3) * 0.3 + 7.0).requires_grad_()  # Q around 1000
    bias = torch.randn(*shape[:-2], 1, 3).requires_grad_()
    operands = x.float(), weight.to(torch.bfloat16).float()  # bf16 operands, as every bf16 layer reads them
    reference = affine(bias, *operands)
    assert 700 < reference.mean() < 1300
    values = fp32_output_layer(x, weight, bias)
    assert values.dtype == torch.float32 and values.shape == reference.shape
    assert (values - reference).abs().max() < 1e-5 * reference.abs().max()
    assert (reference.to(torch.bfloat16).float() - reference).abs().max() > 1.0  # what the layer avoids
    g = torch.randn(reference.shape)
    grads = torch.autograd.grad((values * g).sum(), (x, weight, bias))
    expected = torch.autograd.grad((reference * g).sum(), (x, weight, bias))
    for grad, grad_fp32 in zip(grads, expected, strict=True):
        assert grad.dtype == grad_fp32.dtype and (grad - grad_fp32).float().norm() < 0.01 * grad_fp32.float().norm()
    x32 = x.detach().float()  # --precision fp32: fp32's own product
    assert torch.equal(fp32_output_layer(x32, weight, bias), affine(bias, x32, weight))


def test_fp32_output_layer_reads_the_same_bf16_weights_on_every_device(monkeypatch):
    """The CPU's two bf16 products and the other devices' fp32 product read the same operands: bf16 activations and
    bf16 weights. Run on this CPU, the other devices' branch must give the same values to 1e-5 (with fp32 weights it
    was 3e-4 apart here, 2e-3 on trained weights)."""
    torch.manual_seed(0)
    x = torch.randn(640, 256).relu().to(torch.bfloat16)
    weight, bias = torch.randn(256, 3) * 0.3 + 7.0, torch.randn(1, 3)
    two_products = fp32_output_layer(x, weight, bias)
    monkeypatch.setattr(behavior_model, "TWO_PRODUCTS_ON", ())  # the branch a GPU takes
    one_product = fp32_output_layer(x, weight, bias)
    assert (one_product - two_products).abs().max() < 1e-5 * two_products.abs().max()
    assert (torch.addmm(bias, x.float(), weight) - two_products).abs().max() > 1e-4 * two_products.abs().max()
