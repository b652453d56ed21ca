"""The pipelines' prompts, in French as the original system's, one file each."""

__all__: list[str] = []
