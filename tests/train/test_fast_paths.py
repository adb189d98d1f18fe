"""albef_ds/train/fast_paths.py on a CPU: FP8 refuses with one clear line (no CUDA >= 8.9,
no transformer-engine here), its nn.Linear -> te.Linear swap emulated with a stand-in
te.Linear (same math: losses and gradients bit for bit, names and ties kept); the compile
modes are accepted and "none" leaves the model as it is."""
import types

import pytest
import torch

from tests.support.launch import in_process
from tests.support.tiny import (forward_backward, make_batch, make_model, one_thread, small_config,  # noqa: F401
                                stir, twin)

from albef_ds.cli import bench
from albef_ds.config import ConfigError, load_config
from albef_ds.errors import UsageError
from albef_ds.train import fast_paths



def test_fp8_without_cuda_and_transformer_engine_is_a_one_line_usage_error():
    with pytest.raises(UsageError) as e:
        fast_paths.require_fp8()
    assert str(e.value) == fast_paths.FP8_ERROR and "\n" not in str(e.value)
    assert "compute capability >= 8.9" in str(e.value) and "transformer-engine" in str(e.value)
    cfg = load_config("tiny", ["model.fp8=true"])  # the config accepts it; using it refuses
    with pytest.raises(UsageError, match="model.fp8 needs CUDA"):
        fast_paths.apply(make_model(small_config()), cfg, log=lambda *a: None)
    with pytest.raises(UsageError, match="model.fp8 needs CUDA"):
        bench.fp8_accuracy_check("tiny", steps=1, device="cpu")
    with pytest.raises(UsageError, match="model.fp8 needs CUDA"):
        fast_paths.fp8_autocast(True)


def test_the_bench_with_fp8_on_a_cpu_exits_2_with_the_line():
    code, output = in_process(["bench", "--config", "tiny", "--engine-free", "--options", "fast,model.fp8=true",
                               "--steps", "1", "--warmup", "0"])
    assert code == 2, output[-2000:]
    assert fast_paths.FP8_ERROR in output and "Traceback" not in output


class StandInLinear(torch.nn.Linear):
    """te.Linear's constructor, nn.Linear's math: the swap is tested apart from FP8 rounding."""

    def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
        super().__init__(in_features, out_features, bias=bias, dtype=params_dtype, device=device)


def test_the_fp8_swap_keeps_names_ties_and_the_losses(monkeypatch):
    monkeypatch.setattr(fast_paths, "require_fp8", lambda: types.SimpleNamespace(Linear=StandInLinear))
    # widths that are multiples of 16 (FP8 GEMMs need them): the small test model's are
    plain = stir(make_model(small_config("model.text_width=32", "model.vision_width=32")))
    swapped = twin(plain)
    n = fast_paths.swap_linears_for_fp8(swapped)
    linears = [m for m in plain.modules() if type(m) is torch.nn.Linear]
    assert 0 < n < len(linears)  # the tied MLM decoders (and any odd width) stay nn.Linear
    assert list(dict(plain.named_parameters())) == list(dict(swapped.named_parameters()))
    for enc in (swapped.text_encoder, swapped.text_encoder_m):
        assert type(enc.cls.predictions.decoder) is torch.nn.Linear
        assert enc.cls.predictions.decoder.weight is enc.bert.embeddings.word_embeddings.weight
    assert sum(isinstance(m, StandInLinear) for m in swapped.modules()) == n
    assert all(not p.requires_grad for _, _, p in swapped.momentum_named_params())
    batch = make_batch()
    (out_a, grads_a), (out_b, grads_b) = forward_backward(plain, batch), forward_backward(swapped, batch)
    for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        assert torch.equal(out_a[k], out_b[k]), k
    assert grads_a.keys() == grads_b.keys() and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_compile_modes_are_checked_and_none_leaves_the_model_eager():
    for mode in fast_paths.COMPILE_MODES:
        assert load_config("tiny", [f"train.compile={mode}"]).train.compile == mode
    with pytest.raises(ConfigError, match="train.compile"):
        load_config("tiny", ["train.compile=max-speed"])
    model = make_model(small_config())
    fast_paths.compile_blocks(model, "none")
    assert not any(type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None)
                   for m in model.modules())
    with pytest.raises(UsageError, match="compile mode"):
        fast_paths.compile_blocks(model, "fast")
    fast_paths.compile_blocks(model, "reduce-overhead")  # wraps lazily: compiled at the first call
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in model.visual_encoder.blocks)


def test_config_checks_of_the_new_switches():
    with pytest.raises(ConfigError, match="train.stop_check_every"):
        load_config("tiny", ["train.stop_check_every=0"])
    with pytest.raises(ConfigError, match="model.mlm_masked_bucket"):
        load_config("tiny", ["model.mlm_masked_bucket=-1"])
    cfg = load_config("tiny")  # defaults: today's behaviour
    assert (cfg.train.stop_check_every, cfg.train.stop_check_async, cfg.train.compile,
            cfg.model.mlm_masked_bucket, cfg.model.fp8) == (1, False, "none", 0, False)


#: the tiny model of tests/cli/test_bench.py (its runner builds in a second)
SMALL = ["model.image_res=32", "model.patch_size=8", "model.vision_width=32", "model.vision_depth=2",
         "model.vision_heads=2", "model.text_width=32", "model.text_depth=2", "model.fusion_layer=1",
         "model.text_heads=2", "model.text_intermediate=64", "model.vocab_size=100",
         "model.max_position_embeddings=32", "model.embed_dim=16", "model.queue_size=64",
         "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "train.micro_batch_size=8",
         "data.max_tokens=12", "model.mlm_probability=0.3"]
#: inductor fuses and reorders float32 reductions: the same losses to rounding
COMPILE_RTOL, COMPILE_ATOL = 1e-4, 1e-5


def bench_runner(spec: str) -> "bench.Runner":
    overrides, switches = bench.parse_options(spec)
    cfg = load_config("tiny", SMALL + overrides)
    return bench.Runner(cfg, switches, cfg.train.micro_batch_size, cfg.data.max_tokens, torch.device("cpu"))


@pytest.mark.slow
def test_reduce_overhead_compilation_gives_the_eager_losses_on_two_steps():
    """Compiling on a CPU takes minutes on 2 shared cores: slow lane. On a CPU inductor runs
    without CUDA graphs; the GPU check times the graphs themselves."""
    eager, compiled = bench_runner("fast,model.mlm_masked_bucket=16"), \
        bench_runner("fast,model.mlm_masked_bucket=16,compile=reduce-overhead")
    moved = bench_runner("fast,model.mlm_masked_bucket=16,model.temp=0.08")  # mutation: a real change
    for step in range(2):
        a, b, c = eager.step(), compiled.step(), moved.step()
        for k in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
            torch.testing.assert_close(b[k], a[k], rtol=COMPILE_RTOL, atol=COMPILE_ATOL, msg=f"step {step} {k}")
        assert not torch.allclose(c["loss_itc"], a["loss_itc"], rtol=COMPILE_RTOL, atol=COMPILE_ATOL)
