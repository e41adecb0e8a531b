# Solutions to the exercises of tutorials/05_sparse_autoencoders.ipynb, one block per exercise cell.
# `python -m neuronmap.course solve tutorials/05_sparse_autoencoders.ipynb OUT.ipynb` puts each block into the cell
# tagged with its name. The blocks run in the notebook, after the cells above them, not as a script.

# %% exercise-1
def encode(x):
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())

# %% exercise-2
clean_loss = mean_loss(model.run(batch).logits)
spliced_loss = mean_loss(model.run(batch, saes=[sae]).logits)
zero_loss = mean_loss(model.run(batch, interventions={hook: lambda x, hook: torch.zeros_like(x)}).logits)
recovered = (zero_loss - spliced_loss) / (zero_loss - clean_loss)
print(f"{recovered:.4f}")

# %% exercise-3
eval_tokens = model.to_tokens(eval_texts)
eval_real = eval_tokens != model.tokenizer.pad_token_id
trace = model.run(eval_texts, saes=[shipped], use_error_term=True, capture=f"{hook}.hook_sae_acts_post")
fired = (trace[f"{hook}.hook_sae_acts_post"][eval_real] > 0).float()  # [tokens, latents]
is_object = torch.isin(eval_tokens[eval_real], torch.tensor(model.tokenizer.convert_tokens_to_ids(ioi.OBJECTS))).float()
hits = is_object @ fired  # per latent: tokens where it fires on an object word
f1 = 2 * hits / (fired.sum(0) + is_object.sum())  # 2 TP / (2 TP + FP + FN)
object_latent = int(f1.argmax())
print(object_latent, f"{f1.max():.3f}")

# %% exercise-4
live = (spliced[acts_name][ioi_real] > 0).any(0).nonzero().flatten().tolist()
base = logit_diff(spliced.logits)
effects = {}
for latent in live:
    run = model.run(ioi_texts, saes=[shipped], use_error_term=True, interventions={acts_name: ablate(latent)})
    effects[latent] = logit_diff(run.logits) - base
important_latent = min(effects, key=effects.get)
print(important_latent, f"{effects[important_latent]:+.3f}")
