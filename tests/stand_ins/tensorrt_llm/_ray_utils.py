"""Stand-in of tensorrt_llm/_ray_utils.py: the bare `control_action_decorator` of the 1.2 line."""

import functools


def control_action_decorator(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self.engine.control_action():
            return fn(self, *args, **kwargs)
    return wrapper
