"""Which target layers a draft reads by default (docs/design.md §2.1). Torch-free, so the draft config
and `draftforge recipe` can use it without loading a model stack."""


def default_aux_layers(num_layers: int) -> list[int]:
    """Low / mid / high taps, HF hidden_states indices (Llama-3.1-8B: 2, 16, 29)."""
    return [2, num_layers // 2, num_layers - 3]
