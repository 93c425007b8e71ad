"""The one registry mechanism behind every extension point: register, look up, list, refuse."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mmsphere.errors import ConfigError
from mmsphere.eval.protocols import PROTOCOLS, get_protocol, register_protocol
from mmsphere.models.temporal import TEMPORAL_HEADS
from mmsphere.ood.protocols import OOD_PROTOCOLS, get_ood_protocol, register_ood_protocol
from mmsphere.ood.scores import OOD_SCORES
from mmsphere.registry import Registry


@dataclass(frozen=True)
class Thing:
    size: int


def test_register_lookup_and_listing_keep_registration_order():
    things: Registry[Thing] = Registry("thing", Thing, listing_hint="see things")
    things.register("b", Thing(2))
    things.register("a", Thing(1))
    assert things.names() == ("b", "a") and list(things) == ["b", "a"] and len(things) == 2
    assert things.lookup("a") == Thing(1) and things["b"] == Thing(2) and "a" in things
    with pytest.raises(ConfigError, match=r"^unknown thing 'c'; known: a, b \(see things\)$"):
        things.lookup("c")
    assert things.check("c", "x.kind") == "x.kind='c' must be one of b, a" and things.check("a", "x.kind") is None


def test_a_taken_name_a_wrong_type_and_a_blank_name_are_refused():
    things: Registry[Thing] = Registry("thing", Thing)
    things.register("a", Thing(1))
    things.register("a", Thing(1))  # the same definition again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="a thing named 'a' is already registered"):
        things.register("a", Thing(2))
    with pytest.raises(TypeError, match="a thing must be a Thing, got int"):
        things.register("b", 3)
    with pytest.raises(TypeError, match="a thing must be a Thing, got str"):
        things["b"] = "three"
    with pytest.raises(ValueError, match="non-empty name"):
        things.register("", Thing(1))
    things["a"] = Thing(5)  # assignment replaces (what monkeypatch.setitem does)
    assert things["a"] == Thing(5)
    del things["a"]
    things.unregister("a")  # absent: nothing to do
    assert "a" not in things and things.names() == ()


def test_every_extension_point_is_one_registry():
    for registry in (PROTOCOLS, OOD_PROTOCOLS, OOD_SCORES, TEMPORAL_HEADS):
        assert isinstance(registry, Registry) and len(registry) > 0
    with pytest.raises(ConfigError, match="unknown protocol 'kinetics'; known: activitynet, didemo"):
        get_protocol("kinetics")
    with pytest.raises(ConfigError, match="unknown OoD protocol 'svhn'; known: cifar10, cifar100, imagenet1k-mos"):
        get_ood_protocol("svhn")
    with pytest.raises(TypeError, match="a protocol must be a RetrievalProtocol, got OodProtocol"):
        register_protocol(OOD_PROTOCOLS["cifar10"])
    with pytest.raises(TypeError, match="an? OoD protocol must be a OodProtocol, got RetrievalProtocol"):
        register_ood_protocol(PROTOCOLS["lsmdc"])
