"""CLIP's fixed numbers, which every X-CLIP model inherits and no checkpoint states."""

HEAD_DIM = 64  # the original derives every head count as width // 64
VOCAB_SIZE = 49408  # OpenAI's BPE: 256 bytes x 2 + 48894 merges + start/end tokens
CONTEXT_LENGTH = 77  # tokens per text, start and end tokens included
MIT_LAYERS = 1  # every published variant
PROMPT_LAYERS = 2  # every published variant


def original_heads(width: int) -> int:
    """The original's head count for an attention of `width`, in every family: width // 64."""
    return width // HEAD_DIM
