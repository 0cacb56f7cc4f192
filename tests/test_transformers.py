"""fused_ce.integrations.transformers against the stock Hugging Face models.

Tiny randomly initialised models built from configs (no downloads), float32: the
patched model must give the stock model's loss and the gradients of every
parameter -- labels with -100s, ``num_items_in_batch``, ``shift_labels``,
``logits_to_keep``, Gemma 2's soft-cap, Cohere's and Granite's logit scales, a bias
(Phi), a mixture of experts' auxiliary loss (Mixtral) -- and leave ``generate`` and
calls without labels untouched.

The issue's memory goal (a Llama with V = 32000 on 4 x 256 tokens: the same loss and
gradients, and a forward + backward peak at most 0.6x the stock model's) is checked
in fresh subprocesses; run this file as a script to print the measurement::

    python tests/test_transformers.py            # both variants, a table and the ratio
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_ce  # noqa: E402
import fused_ce.integrations.transformers as fused_hf  # noqa: E402
from fused_ce.integrations._model_code import logit_transform  # noqa: E402
from fused_ce.memory import measure_peak_mb  # noqa: E402

VOCAB = 97
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    # Larger than the default 0.02, so the logits spread over a few nats and the
    # soft-cap and scales matter.
    initializer_range=0.3,
)

# family: (config extras, what it exercises)
FAMILIES = {
    "Llama": {},
    "Mistral": {},
    "Qwen2": {},
    "Gemma": dict(head_dim=8),  # tied embeddings
    "Gemma2": dict(head_dim=8, final_logit_softcapping=1.5),  # soft-capped logits
    "Cohere": dict(logit_scale=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2),  # logits * logit_scale
    "Granite": dict(logits_scaling=4.0),  # logits / logits_scaling
    "Phi": {},  # an lm_head with a bias
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True),  # + auxiliary loss
}
REQUIRED = ["Llama", "Mistral", "Qwen2", "Gemma", "Gemma2"]


def make_model(family: str, seed: int = 0, **overrides):
    config = getattr(transformers, f"{family}Config")(**{**TINY, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).float()
    return model.train()


def make_batch(batch: int = 3, seq: int = 11, vocab: int = VOCAB, seed: int = 1):
    """input_ids, and labels with -100 on a left-padded prefix and at scattered positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1 % batch, 5] = -100
    labels[-1, -1] = -100
    return ids, labels


def loss_and_grads(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_same(stock, fused, stock_grads, fused_grads):
    torch.testing.assert_close(fused.loss, stock.loss, rtol=1e-5, atol=1e-6)
    assert fused.loss.dtype == stock.loss.dtype == torch.float32
    assert stock_grads.keys() == fused_grads.keys()
    for name, g in stock_grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-5 * scale + 1e-9, msg=name)


def assert_apply_keeps_loss_and_grads(model, *args, **kwargs):
    """The stock model's loss and gradients on (args, kwargs), then the same call after apply."""
    stock, stock_grads = loss_and_grads(model, *args, **kwargs)
    fused_hf.apply(model)
    fused, fused_grads = loss_and_grads(model, *args, **kwargs)
    assert_same(stock, fused, stock_grads, fused_grads)
    return stock, fused


@pytest.fixture(autouse=True)
def _float32_default():
    saved = torch.get_default_dtype()
    yield
    torch.set_default_dtype(saved)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_loss_and_gradients(family):
    model = make_model(family)
    ids, labels = make_batch()
    stock, fused = assert_apply_keeps_loss_and_grads(model, input_ids=ids, labels=labels)
    assert type(fused) is type(stock)
    assert fused.logits is None and "logits" not in fused
    if family == "Mixtral":  # the auxiliary loss is still the stock model's, and added
        torch.testing.assert_close(fused.aux_loss, stock.aux_loss)


@pytest.mark.parametrize("family", REQUIRED)
def test_positional_labels(family):
    # labels as the sixth positional argument (input_ids, attention_mask, position_ids, cache, inputs_embeds, labels).
    model = make_model(family)
    ids, labels = make_batch()
    _, fused = assert_apply_keeps_loss_and_grads(model, ids, None, None, None, None, labels)
    assert fused.logits is None


@pytest.mark.parametrize("num_items", ["tensor", "int"])
@pytest.mark.parametrize("family", ["Llama", "Gemma2"])
def test_num_items_in_batch(family, num_items):
    # Gradient accumulation: the sum over the tokens, divided by the count over all micro-batches.
    model = make_model(family)
    ids, labels = make_batch()
    n = torch.tensor(57) if num_items == "tensor" else 57
    assert_apply_keeps_loss_and_grads(model, input_ids=ids, labels=labels, num_items_in_batch=n)


def test_shift_labels():
    # Labels already shifted (e.g. by a data collator for packed sequences) are used as given.
    model = make_model("Llama")
    ids, labels = make_batch()
    shift = torch.roll(labels, -3, dims=1)
    assert_apply_keeps_loss_and_grads(model, input_ids=ids, labels=labels, shift_labels=shift)


def test_attention_mask_and_ignore_index():
    model = make_model("Qwen2")
    ids, labels = make_batch()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    labels = torch.where(labels == -100, 7, labels)  # class 7 is the ignored one here
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, ignore_index=7)
    assert_apply_keeps_loss_and_grads(model, **kwargs)


@pytest.mark.parametrize("keep", ["int", "positions"])
def test_logits_to_keep(keep):
    # The loss over the kept positions only (labels of the kept length, as the stock model needs).
    model = make_model("Gemma2")
    ids, labels = make_batch(seq=12)
    if keep == "int":
        logits_to_keep, kept = 5, labels[:, -5:]
    else:
        positions = torch.tensor([0, 2, 3, 7, 11])
        logits_to_keep, kept = positions, labels[:, positions]
    kwargs = dict(input_ids=ids, labels=kept, logits_to_keep=logits_to_keep)
    stock, stock_grads = loss_and_grads(model, **kwargs)
    assert stock.logits.shape == (3, 5, VOCAB)
    fused_hf.apply(model)
    fused, fused_grads = loss_and_grads(model, **kwargs)
    assert_same(stock, fused, stock_grads, fused_grads)


def test_eval_without_grad():
    model = make_model("Mistral").eval()
    ids, labels = make_batch()
    with torch.no_grad():
        stock = model(input_ids=ids, labels=labels)
        fused_hf.apply(model)
        fused = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(fused.loss, stock.loss, rtol=1e-5, atol=1e-6)
    assert fused.logits is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_loss_is_float32(dtype):
    # As transformers' loss (which upcasts the logits): float32, close to the stock value.
    model = make_model("Llama").to(dtype)
    ids, labels = make_batch()
    stock, _ = loss_and_grads(model, input_ids=ids, labels=labels)
    fused_hf.apply(model)
    fused, grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert fused.loss.dtype == stock.loss.dtype == torch.float32
    torch.testing.assert_close(fused.loss, stock.loss, rtol=2e-2, atol=2e-2)
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads.values())


# --------------------------------------------------------------------------- outputs and options


def test_return_dict_false():
    model = make_model("Llama")
    ids, labels = make_batch()
    stock = model(input_ids=ids, labels=labels, return_dict=False)
    fused_hf.apply(model)
    fused = model(input_ids=ids, labels=labels, return_dict=False)
    # to_tuple() of the output with logits=None: (loss, cache) -- no logits entry.
    assert isinstance(fused, tuple) and len(fused) == len(stock) - 1
    torch.testing.assert_close(fused[0], stock[0], rtol=1e-5, atol=1e-6)


def test_return_logits():
    model = make_model("Gemma2")
    ids, labels = make_batch()
    stock, stock_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    fused_hf.apply(model, return_logits=True)
    fused, fused_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert_same(stock, fused, stock_grads, fused_grads)
    torch.testing.assert_close(fused.logits, stock.logits)  # soft-capped, as the stock model's
    fused_hf.apply(model)  # applying again changes the option
    assert model(input_ids=ids, labels=labels).logits is None


@pytest.mark.parametrize("family", ["Llama", "Gemma2"])
def test_calls_without_labels_unchanged(family):
    model = make_model(family).eval()
    ids, _ = make_batch()
    with torch.no_grad():
        stock = model(input_ids=ids)
        fused_hf.apply(model)
        fused = model(input_ids=ids)
        last = model(input_ids=ids, logits_to_keep=1)
    assert fused.loss is None
    torch.testing.assert_close(fused.logits, stock.logits, rtol=0, atol=0)
    torch.testing.assert_close(last.logits, stock.logits[:, -1:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", REQUIRED)
def test_generate_unchanged(family):
    model = make_model(family).eval()
    ids, _ = make_batch(batch=2, seq=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    stock = model.generate(ids, **kwargs)
    fused_hf.apply(model)
    fused = model.generate(ids, **kwargs)
    assert torch.equal(fused, stock)


def test_apply_is_idempotent_and_revert_restores():
    model = make_model("Llama")
    ids, labels = make_batch()
    stock, stock_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert fused_hf.apply(model) is model
    fused_hf.apply(model)
    assert fused_hf.is_applied(model)
    assert len(model.lm_head._forward_pre_hooks) == 1
    assert model(input_ids=ids, labels=labels).logits is None
    assert fused_hf.revert(model) is model
    assert not fused_hf.is_applied(model)
    assert len(model.lm_head._forward_pre_hooks) == 0
    assert "forward" not in model.__dict__ and "_loss_function" not in model.__dict__
    reverted, reverted_grads = loss_and_grads(model, input_ids=ids, labels=labels)
    assert reverted.logits is not None
    assert_same(stock, reverted, stock_grads, reverted_grads)
    fused_hf.revert(model)  # reverting an unpatched model does nothing


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_carry_their_own_patch(how):
    # EMA and reference models are made with copy.deepcopy: the copy's loss must use the copy's weights.
    import copy
    import io

    model = fused_hf.apply(make_model("Llama"))
    ids, labels = make_batch()
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    out = twin(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    assert twin.lm_head.weight.grad is not None and model.lm_head.weight.grad is None
    fused_hf.revert(twin)
    stock = twin(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, stock.loss, rtol=1e-5, atol=1e-6)
    assert fused_hf.is_applied(model) and len(model.lm_head._forward_pre_hooks) == 1


def test_loss_function_outside_a_fused_call_is_the_stock_loss():
    # model.loss_function called directly (on logits) is transformers' ForCausalLMLoss.
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = fused_hf.apply(make_model("Llama"))
    logits = torch.randn(2, 5, VOCAB)
    labels = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(model.loss_function(logits, labels, VOCAB), ForCausalLMLoss(logits, labels, VOCAB))


def test_wrapped_forward_keeps_signature():
    import inspect

    model = make_model("Llama")
    before = inspect.signature(model.forward)
    fused_hf.apply(model)
    assert inspect.signature(model.forward) == before


def test_fused_causal_lm_loss_matches_for_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(VOCAB, 16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 7))
    labels[1, :3] = -100
    for n in (None, torch.tensor(9)):
        expected = ForCausalLMLoss(hidden @ weight.t(), labels, VOCAB, num_items_in_batch=n)
        got = fused_hf.fused_causal_lm_loss(hidden, weight, labels, num_items_in_batch=n)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- refusals and imports


def test_refuses_a_custom_loss_function():
    model = make_model("Llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum()
    with pytest.raises(NotImplementedError, match="ForCausalLMLoss"):
        fused_hf.apply(model)
    assert not fused_hf.is_applied(model)


def test_refuses_an_unknown_forward():
    # Bamba adds a z-loss computed from the logits after the loss: it cannot be fused here.
    with pytest.raises(NotImplementedError, match="uses the logits for more than the loss"):
        logit_transform(transformers.BambaForCausalLM)
    # A subclass whose forward post-processes the logits another way.
    class Scaled(transformers.LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, **kwargs):
            hidden_states = self.model(input_ids=input_ids).last_hidden_state
            logits = self.lm_head(hidden_states)
            logits = logits * 2.0
            loss = None
            if labels is not None:
                loss = self.loss_function(logits, labels, self.config.vocab_size)
            return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)

    with pytest.raises(NotImplementedError, match=r"does not know:\nlogits = logits \* 2.0"):
        fused_hf.apply(Scaled(transformers.LlamaConfig(**TINY)))


def test_refuses_what_is_not_a_transformers_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fused_hf.apply(torch.nn.Linear(2, 3))


def test_importing_fused_ce_does_not_import_transformers():
    code = (
        "import sys, fused_ce, fused_ce.integrations, fused_ce.integrations.transformers; "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_subprocess_env())


def test_missing_transformers_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    monkeypatch.delitem(sys.modules, "transformers.loss.loss_utils", raising=False)
    with pytest.raises(ImportError, match="needs the Hugging Face transformers package"):
        fused_hf.apply(torch.nn.Linear(2, 3))


# --------------------------------------------------------------------------- memory: the goal

PEAK_CONFIG = dict(
    vocab_size=32000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
PEAK_BATCH = (4, 256)


def _peak_model_and_batch():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**PEAK_CONFIG)).float().train()
    ids, labels = make_batch(*PEAK_BATCH, vocab=PEAK_CONFIG["vocab_size"], seed=2)
    labels[:, :32] = -100  # a prompt that is not trained on
    return model, ids, labels


def test_fused_path_makes_no_logits():
    model = fused_hf.apply(make_model("Llama"))
    ids, labels = make_batch()
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    out = model(input_ids=ids, labels=labels)
    hook.remove()
    assert shapes == [(3, 0, VOCAB)]  # lm_head ran on an empty slice
    assert out.logits is None


def test_llama_32k_same_loss_and_gradients():
    model, ids, labels = _peak_model_and_batch()
    assert_apply_keeps_loss_and_grads(model, input_ids=ids, labels=labels)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_llama_32k_peak_memory_at_most_0_6x_of_stock():
    stock, fused = (_measure_in_subprocess(variant) for variant in ("stock", "fused"))
    assert fused["loss"] == pytest.approx(stock["loss"], rel=1e-5)
    # Measured 0.12 (60 MiB against 524 MiB, 2 threads); the goal is 0.6.
    assert fused["extra_peak_mib"] <= 0.6 * stock["extra_peak_mib"], (stock, fused)


def _subprocess_env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(fused_ce.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _measure_in_subprocess(variant: str) -> dict:
    # A fresh process per variant: the other's freed memory cannot hide in the allocator.
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--peak", variant],
        check=True, capture_output=True, text=True, env=_subprocess_env(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_peak(variant: str) -> dict:
    """Extra peak RSS of one forward + backward of the V = 32000 Llama on 4 x 256 tokens.

    After a warm-up step (thread pools, BLAS buffers) and with the parameter gradients
    freed: ``malloc_trim(0)``, reset the peak (``5 > /proc/self/clear_refs``), read
    VmRSS, run the step, read VmHWM. The difference includes the new parameter
    gradients (the same for both variants: 2 x 16 MiB for the embedding and lm_head).
    """
    model, ids, labels = _peak_model_and_batch()
    if variant == "fused":
        fused_hf.apply(model)
    elif variant != "stock":
        raise ValueError(f"variant must be 'stock' or 'fused', got {variant!r}")

    def step():
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        return out.loss.item()

    step()
    model.zero_grad(set_to_none=True)
    losses = []
    # gc, malloc_trim, reset VmHWM, read VmRSS, run, read VmHWM (fused_ce.memory).
    peak = measure_peak_mb(lambda: losses.append(step()), torch.device("cpu"))
    return {"variant": variant, "loss": losses[0], "extra_peak_mib": peak}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        print(json.dumps(measure_peak(sys.argv[2])))
    else:
        results = {v: _measure_in_subprocess(v) for v in ("stock", "fused")}
        n = PEAK_BATCH[0] * PEAK_BATCH[1]
        print(f"LlamaForCausalLM, V = {PEAK_CONFIG['vocab_size']}, D = {PEAK_CONFIG['hidden_size']}, "
              f"{PEAK_CONFIG['num_hidden_layers']} layers, {PEAK_BATCH[0]} x {PEAK_BATCH[1]} = {n} tokens, float32, "
              f"forward + backward, {torch.get_num_threads()} threads")
        print(f"(fp32 logits alone: {n * PEAK_CONFIG['vocab_size'] * 4 / 2**20:.0f} MiB)")
        for v, r in results.items():
            print(f"  {v:5s}  loss {r['loss']:.6f}  extra peak RSS {r['extra_peak_mib']:7.1f} MiB")
        ratio = results["fused"]["extra_peak_mib"] / results["stock"]["extra_peak_mib"]
        print(f"  fused / stock: {ratio:.3f}  (goal <= 0.6)")
