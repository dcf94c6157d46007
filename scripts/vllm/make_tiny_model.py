"""Build a tiny random-weight Llama + byte-level BPE tokenizer for CPU vLLM tests.

No model hub is reachable from the machines this project runs on, so the slow
tier serves a model generated here: 2 layers, hidden 128, 4 heads of dim 32
(CPU attention supports head_dim 32, 64, 80, ... but not 16), 2 KV heads,
vocabulary 512, context 2048. Weights come from a fixed seed, the tokenizer
from a fixed corpus: running this twice gives the same files, and vLLM's greedy
output for a prompt is the same on every machine. The output is gibberish;
the tests compare token streams, not meaning.

Run with the vLLM environment's interpreter (it has torch, transformers and
tokenizers): ``$PDROUTE_CACHE/vllm-env/bin/python make_tiny_model.py OUT_DIR``.
A ``.pdroute-complete`` marker is written last; an existing complete directory
is left alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

CORPUS = [
    "The prefill pod computes the KV cache and the decode pod generates tokens.",
    "Once upon a time there was a tiny language model that lived on a CPU.",
    "Hello world! How are you today? The quick brown fox jumps over the lazy dog.",
    "Disaggregated serving splits prefill and decode across pods.",
    "An endpoint picker scores pods by queue depth, KV-cache usage and prefix affinity.",
    "Envoy asks the picker over gRPC where each request should go.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \" @ # $ % & _ ~",
    "user assistant system: You are a helpful assistant.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

VOCAB_SIZE = 512
SEED = 1234


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(SEED)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output directory")
    args = p.parse_args(argv)
    out: Path = args.out
    if (out / ".pdroute-complete").exists():
        print(f"{out}: already complete")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=out.parent))
    try:
        build(tmp)
        (tmp / ".pdroute-complete").write_text("ok\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is read by other users' vLLMs
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{out}: tiny Llama written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
