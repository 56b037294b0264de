"""Data: a tokenizer, an English pretraining corpus from the standard library, an instruction dataset, and the
check of token ids a model can embed (token_ids.py)."""
from .tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from .corpus import corpus_stats, english_documents, split_documents
from .instructions import (Example, load_jsonl, prompt, random_sentence, save_jsonl, split_examples, yoda,
                           yoda_dataset)
from .batches import IGNORE, InstructionSet, TokenStream, encode_example
