"""Text: Matryoshka sentence embeddings, by fine-tuning or after the fact.

Submodules (sentence-transformers is imported only where needed, through the ``text`` extra):

- `mrl.text.corpus`: the two dataset shapes (`RetrievalDataset`, `LabelledCorpus`).
- `mrl.text.cranfield`, `mrl.text.bbc`, `mrl.text.beir`: loaders; `mrl.text.pairs`: training pairs.
- `mrl.text.encoders`: load a sentence-transformers folder (default all-MiniLM-L6-v2), encode once.
- `mrl.text.finetune`: Matryoshka contrastive fine-tuning; `mrl.text.st_loss`: the same loss for
  sentence-transformers' own trainer.
- `mrl.text.adaptor`: post-hoc orthogonal Matryoshka map for frozen embeddings.
- `mrl.text.evaluation`: every prefix in one pass, tidy records, `mrl eval` for text models.
"""
