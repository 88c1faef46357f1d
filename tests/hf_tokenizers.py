"""Real Hugging Face tokenizers with chat templates, built offline from the data fixtures (no hub)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "data"

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
            "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def build_hf_tokenizer(directory: Path, style: str) -> Path:
    """A word-level `tokenizers` model over the fixtures' words, wrapped as PreTrainedTokenizerFast with
    a ChatML (Qwen-style) or Llama-3-style chat template, saved and reloadable with AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [line.decode("utf-8", "replace") for f in FIXTURES.glob("*.jsonl") for line in f.read_bytes().splitlines()]
    texts.append(". ? , : !")  # in the JSON lines they are glued to quotes and braces
    words.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", *SPECIALS[style]]))
    if style == "chatml":
        tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                                      eos_token="<|im_end|>", chat_template=CHATML)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                                      bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3)
    tok.save_pretrained(str(directory))
    return directory
