# Solutions to the exercises of tutorials/04_circuits.ipynb, one block per exercise cell.
# `python -m neuronmap.course solve tutorials/04_circuits.ipynb OUT.ipynb` puts each block into the cell tagged
# with its name. The blocks run in the notebook, after the cells above them, not as a script.

# %% exercise-1
def count_edges(n_layers, n_heads):
    total = 0
    for layer in range(n_layers):
        earlier = 1 + layer * (n_heads + 1)  # the embeddings, and every head and MLP of the layers before
        total += 3 * n_heads * earlier  # each head's query, key and value read all of them
        total += earlier + n_heads  # the MLP reads them, and its own layer's heads
    return total + 1 + n_layers * (n_heads + 1)  # the logits read every sender

# %% exercise-2
n_heads = g.n_heads
totals = {
    head: sum(induction_ig.scores[g.sender(f"A0.{head}"), g.receiver(f"A1.{other}.k")].item() for other in range(n_heads))
    for head in range(n_heads)
}
print({head: round(total, 3) for head, total in totals.items()})
key_sender = (0, max(totals, key=totals.get))

# %% exercise-3
every_size = induction_ig.faithfulness(range(1, g.n_edges + 1), baseline=False)
smallest_k = next(size for size, value in zip(every_size.sizes, every_size.values) if value >= 0.8)
print(smallest_k)

# %% exercise-4
into_name_mover = [(edge, score) for edge, score in ioi_ig.top(ioi_ig.graph.n_edges) if "->A1.2." in edge]
name_mover_input = into_name_mover[0][0]  # top() is sorted by |score|
print([(edge, round(score, 3)) for edge, score in into_name_mover[:3]])
