"""Training recipes of the zoo's models: one module per entry, each with `train(out_dir, quick=False, seed=0)`
(trains, saves the HF model and tokenizer with `save_pretrained`, measures, writes `card.json`) and
`measure(model)` (the card's figures, recomputed from a loaded `neuronmap.Model`)."""
