"""A tiny sentence-transformers model built locally (no download): a small BERT with random weights over a word
vocabulary of the given texts, mean pooling."""
from pathlib import Path


def tiny_st_model(directory: Path, texts: list[str], seed: int = 0, hidden: int = 32, layers: int = 1,
                  silent: tuple[str, ...] = ()) -> Path:
    """The model's folder; `silent` words (and [CLS], [SEP]) get zero input embeddings, so that texts are told
    apart by their other words."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    hf = Path(directory) / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64, initializer_range=0.02)
    bert = BertModel(config)
    with torch.no_grad():  # no position signal: the embedding is about the words (less alike for every text)
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
        for word in ("[CLS]", "[SEP]", *silent):
            bert.embeddings.word_embeddings.weight[vocab.index(word)] = 0
    bert.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    model = SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=48),
                                         models.Pooling(hidden, "mean")], device="cpu")
    model.save(str(directory))
    return Path(directory)
