"""Build small random-weight checkpoints (and a tiny tokenizer) in temporary folders.

Hugging Face transformers is the reference: the checkpoints are made with ``LlamaForCausalLM``
(or another family's ``*ForCausalLM``) and ``save_pretrained``, so the runtime's loader reads
exactly what the Hub format looks like.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB_WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "then"]


def make_llama(path, *, hidden=64, heads=4, kv_heads=2, layers=2, vocab=160, intermediate=None,
               head_dim=None, max_pos=256, tie=False, dtype=torch.float32, seed=0, init_std=0.08,
               rope=None, max_shard_size=None, eos_token_id=2, tokenizer=False):
    """Save a random ``LlamaForCausalLM`` to ``path`` and return the (fp32 eval) HF model.

    ``rope``: None (default RoPE), or a dict of rope parameters such as
    ``{"rope_type": "llama3", "factor": 8.0, ...}``. ``init_std`` is large enough that greedy
    choices are not near-ties. ``max_shard_size`` (e.g. ``"20KB"``) writes sharded safetensors.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden + 16,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos, tie_word_embeddings=tie, initializer_range=init_std,
        bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=0, rms_norm_eps=1e-5,
    )
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if rope is not None:
        kwargs["rope_scaling"] = dict(rope)
        kwargs["rope_theta"] = rope.get("rope_theta", 10000.0)
    torch.manual_seed(seed)
    config = LlamaConfig(**kwargs)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 so that they are really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    path = Path(path)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(path, **save_kwargs)
    if tokenizer:
        make_tokenizer(path, vocab)
    return model.float().eval()


FAMILY_CLASSES = {  # short name -> (transformers config class, model class)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}


def make_family(path, family: str, *, hidden=64, heads=4, kv_heads=2, layers=3, vocab=128, max_pos=256,
                seed=0, init_std=0.08, **config):
    """Save a random ``<family>ForCausalLM`` (fp32) to ``path`` and return the (eval) HF model.

    ``config``: family fields (``head_dim``, ``sliding_window``, ``attn_logit_softcapping``, ...).
    Norm weights are moved away from their identity value and biases away from zero, so that
    both are really tested.
    """
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILY_CLASSES[family])
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 16,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_pos, initializer_range=init_std, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **config)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    identity = 0.0 if family == "gemma2" else 1.0  # Gemma's norms scale by (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(identity + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(Path(path))
    return model


def make_tokenizer(path, vocab: int) -> None:
    """A word-level ``tokenizer.json`` whose ids stay below ``vocab``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in VOCAB_WORDS:
        words[w] = len(words)
    for i in range(len(words), vocab):
        words[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(Path(path) / "tokenizer.json"))


def hf_greedy(model, prompt: list[int], max_new_tokens: int, **kwargs) -> tuple[list[int], float]:
    """HF greedy continuation of one prompt (stops at EOS): (new token ids, summed logprob)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0, **kwargs)
    new = out.sequences[0, len(prompt):].tolist()
    logprobs = torch.stack([lg[0] for lg in out.logits]).float().log_softmax(-1)
    return new, float(logprobs[torch.arange(len(new)), torch.tensor(new)].sum())


def random_prompts(lengths, vocab: int, seed: int = 0, low: int = 3) -> list[list[int]]:
    """Random token-id prompts avoiding the special ids 0..2."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab, (n,), generator=g).tolist() for n in lengths]


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
