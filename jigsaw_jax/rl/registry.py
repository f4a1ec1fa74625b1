"""Named functions a config picks by string (GRPO's losses and advantage estimators), checked when
the experiment starts: an unknown name is an error that lists the registered ones."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

Fn = TypeVar("Fn", bound=Callable)


class Registry(Generic[Fn]):
  """name -> function, for one kind of function (`kind` names it in errors)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._fns: Dict[str, Fn] = {}

  def register(self, name: str) -> Callable[[Fn], Fn]:
    def wrap(fn: Fn) -> Fn:
      if name in self._fns:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._fns[name] = fn
      return fn
    return wrap

  def get(self, name: str) -> Fn:
    if name not in self._fns:
      raise ValueError(f"Unknown {self.kind} {name!r}; registered: {self.names()}.")
    return self._fns[name]

  def names(self) -> List[str]:
    return sorted(self._fns)

  def __contains__(self, name: str) -> bool:
    return name in self._fns
