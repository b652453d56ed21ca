"""SQL files of the schema: the extractor's tables and the runtime's additions."""

__all__: list[str] = []
