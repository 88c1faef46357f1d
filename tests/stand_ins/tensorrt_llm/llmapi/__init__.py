"""Stand-in (tests/stand_ins/tensorrt_llm/__init__.py)."""


class KvCacheConfig:
    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)
