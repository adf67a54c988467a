"""COCO category ids <-> the contiguous label ids 0..L-1 a model predicts."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

__all__ = ["CocoCategories"]


@dataclass(frozen=True)
class CocoCategories:
    """The label set of a COCO annotation file, in ascending category-id order.

    `category_ids[label]` is the COCO id of model label `label`; `names[label]` its name; `is_thing[label]`
    whether it is a countable object (COCO panoptic "isthing"; instance files hold things only).
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    is_thing: tuple[bool, ...]

    @classmethod
    def from_coco(cls, categories: object, *, source: str, things_by_default: bool) -> CocoCategories:
        if not isinstance(categories, list) or not categories:
            raise ValueError(f"{source} has no 'categories' list; a COCO file must list its categories as "
                             f"[{{'id': ..., 'name': ...}}, ...].")
        seen: dict[int, dict] = {}
        for category in categories:
            if not isinstance(category, dict) or not isinstance(category.get("id"), int) or "name" not in category:
                raise ValueError(f"{source}: category {category!r} needs an integer 'id' and a 'name'.")
            if category["id"] in seen:
                raise ValueError(f"{source}: category id {category['id']} is listed twice "
                                 f"({seen[category['id']]['name']!r} and {category['name']!r}).")
            seen[category["id"]] = category
        ordered = [seen[category_id] for category_id in sorted(seen)]
        return cls(category_ids=tuple(c["id"] for c in ordered), names=tuple(str(c["name"]) for c in ordered),
                   is_thing=tuple(bool(c.get("isthing", things_by_default)) for c in ordered))

    def label_of(self, category_id: object) -> int | None:
        """The contiguous label of a COCO category id, None when the id is not in this label set."""
        return self._label_by_category_id.get(category_id) if isinstance(category_id, int) else None

    @cached_property
    def _label_by_category_id(self) -> dict[int, int]:
        return {category_id: label for label, category_id in enumerate(self.category_ids)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def thing_label_ids(self) -> list[int]:
        return [label for label, thing in enumerate(self.is_thing) if thing]

    @property
    def stuff_label_ids(self) -> list[int]:
        return [label for label, thing in enumerate(self.is_thing) if not thing]
