"""Redis Cluster slots (broker/bus/redis_cluster.py): CRC16, hash tags, how evenly per-topic
tags spread over 3..16 equal shards, the URL, the sharded scripts, SSUBSCRIBE per slot."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from broker.bus.lua import SCRIPTS, SHARDED
from broker.bus.redis import _Session
from broker.bus.redis_cluster import (
    SLOTS,
    RedisClusterBus,
    SlotMap,
    crc16,
    keyslot,
    parse_cluster_url,
    parse_slots,
)
from broker.errors import ConfigError
from broker.settings import Settings

# Realistic topic families: sequential ids, user ids, rooms, dotted paths, ticker symbols.
FAMILIES = {
    "chat.N": "chat.{}",
    "user:N": "user:{}:inbox",
    "room-N": "room-{}",
    "orders.eu.N": "orders.eu.{}",
    "N": "{}",
}


def plain_crc16(data: bytes) -> int:
    """CRC16-CCITT/XMODEM bit by bit (polynomial 0x1021, init 0), as in the Redis source."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def shard_of(slot: int, shards: int) -> int:
    """The shard owning `slot` when the slots are split into `shards` equal ranges (as
    `redis-cli --cluster create` and tests/support/redis_cluster.py do)."""
    return slot * shards // SLOTS


def test_crc16_is_redis_cluster_s() -> None:
    assert crc16(b"123456789") == 0x31C3  # the check value in the Redis Cluster spec
    for data in (b"", b"a", b"chat.1", bytes(range(256)), "é{}".encode()):
        assert crc16(data) == plain_crc16(data)


def test_keyslot_follows_hash_tags() -> None:
    assert keyslot(b"foo") == crc16(b"foo") % SLOTS
    assert keyslot(b"redwire:{chat.1}:m") == keyslot(b"chat.1")
    assert keyslot(b"redwire:t:{chat.1}") == keyslot(b"chat.1")  # a topic's channel
    assert keyslot(b"{}x") == crc16(b"{}x") % SLOTS  # an empty tag is no tag
    assert keyslot(b"a{b}{c}") == keyslot(b"b")  # the first tag counts
    assert keyslot(b"a{b") == crc16(b"a{b") % SLOTS


def test_a_topic_s_keys_and_channel_share_one_slot() -> None:
    bus = RedisClusterBus("redis+cluster://127.0.0.1:1", Settings(), "w1")
    for topic in ("chat.1", "a:b-c_d.e", "x" * 200):
        slots = {keyslot(bus.channel(topic))}
        slots.update(keyslot(bus.key(topic, s)) for s in ("m", "h", "p", "k:order-1", "w:ab12"))
        assert slots == {bus.slot(topic)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("count, tolerance", [(1000, 0.25), (10000, 0.06)])
def test_per_topic_tags_spread_evenly_over_3_to_16_shards(
    family: str, count: int, tolerance: float
) -> None:
    # Random placement would put a shard about 2.5 standard deviations from the mean at
    # worst: 16 shards x 1000 topics, 62.5 +- 7.8 each (~30 %); 10000 topics: ~10 %.
    slots = [keyslot(b"{" + FAMILIES[family].format(i).encode() + b"}") for i in range(count)]
    for shards in range(3, 17):
        per_shard = Counter(shard_of(slot, shards) for slot in slots)
        mean = count / shards
        worst = max(abs(per_shard[s] - mean) / mean for s in range(shards))
        assert worst <= tolerance, (family, shards, sorted(per_shard.items()))


def test_a_tag_per_shard_index_would_be_uneven() -> None:
    # centrifuge#554: short tags `{0}`..`{N-1}` (one per client-side shard) land unevenly on
    # the cluster's equal slot ranges: with 8 or 16 shards half of them get none.
    for shards in (8, 16):
        used = {shard_of(keyslot(b"{%d}" % i), shards) for i in range(shards)}
        assert len(used) <= shards // 2


def test_the_sharded_scripts_publish_with_spublish_only() -> None:
    for script in SCRIPTS:
        sharded = SHARDED[script]
        assert sharded.name == script.name + "_sharded"
        assert (sharded.sha != script.sha) == (b"'PUBLISH'" in script.source)  # history: same
        assert b"'PUBLISH'" not in sharded.source
        assert sharded.source.count(b"'SPUBLISH'") == script.source.count(b"'PUBLISH'")
        assert sharded.source.replace(b"'SPUBLISH'", b"'PUBLISH'") == script.source


def test_cluster_urls() -> None:
    seeds, node_url = parse_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7001")
    assert seeds == ["10.0.0.1:7000", "10.0.0.2:7001"]
    assert node_url("10.0.0.3:7002") == "redis://10.0.0.3:7002/0"
    seeds, node_url = parse_cluster_url("redis+cluster://u:p%40ss@h1:1, h2:2/0?socket_keepalive=1")
    assert seeds == ["h1:1", "h2:2"]
    assert node_url("h3:3") == "redis://u:p%40ss@h3:3/0?socket_keepalive=1"
    for bad in ("redis+cluster://h1", "redis+cluster://h1:1,:2", "redis+cluster://h:1/3"):
        with pytest.raises(ConfigError):
            parse_cluster_url(bad)
    with pytest.raises(ConfigError, match="channel_prefix"):
        RedisClusterBus("redis+cluster://h:1", Settings(channel_prefix="a{b}:"), "w1")


def test_settings_accept_cluster_urls() -> None:
    settings = Settings(redis_url="redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert settings.redis_url is not None


def test_slot_map_from_cluster_slots() -> None:
    reply = [
        [5461, 10922, [b"", 7001, b"id2"], [b"10.0.0.9", 7004, b"id5"]],
        [0, 5460, [b"10.0.0.1", 7000, b"id1"]],
        [10923, 16383, [b"10.0.0.3", 7002, b"id3"]],
    ]
    slot_map = parse_slots(reply, "10.0.0.2")
    assert slot_map.masters == ["10.0.0.1:7000", "10.0.0.2:7001", "10.0.0.3:7002"]
    owners = slot_map.owners
    assert (owners[0], owners[5461], owners[16383]) == (
        "10.0.0.1:7000",
        "10.0.0.2:7001",
        "10.0.0.3:7002",
    )
    assert slot_map == parse_slots(list(reversed(reply)), "10.0.0.2")
    assert slot_map != SlotMap(slot_map.ranges[:2])


def test_ssubscribe_commands_hold_one_slot_each() -> None:
    s = _Session(None)
    channels = [b"redwire:t:{chat.%d}" % i for i in range(50)]
    s.topics = dict.fromkeys(channels, "t")
    s.dirty.update(channels)
    commands = s.reconcile(
        lambda ch: True, 10, (b"SSUBSCRIBE", b"SUNSUBSCRIBE"), keyslot
    )  # at most 10 channels, one slot, per command
    assert sorted(ch for c in commands for ch in c[1:]) == sorted(channels)
    for command in commands:
        assert command[0] == b"SSUBSCRIBE" and 1 <= len(command) - 1 <= 10
        assert len({keyslot(ch) for ch in command[1:]}) == 1
    same_slot = [b"x{same}%d" % i for i in range(25)]
    s.dirty.update(same_slot)
    s.topics.update(dict.fromkeys(same_slot, "t"))
    batched = s.reconcile(lambda ch: True, 10, (b"SSUBSCRIBE", b"SUNSUBSCRIBE"), keyslot)
    assert [len(c) - 1 for c in batched] == [10, 10, 5]
    assert re.fullmatch(rb"x\{same\}\d+", batched[0][1])


def test_make_bus_chooses_by_url() -> None:
    from broker.bus import make_bus
    from broker.bus.redis_sentinel import RedisSentinelBus

    cluster = make_bus(Settings(redis_url="redis+cluster://127.0.0.1:1,127.0.0.1:2"), "w")
    assert isinstance(cluster, RedisClusterBus) and cluster.seeds == ["127.0.0.1:1", "127.0.0.1:2"]
    sentinel = make_bus(Settings(redis_url="redis+sentinel://127.0.0.1:1/main"), "w")
    assert isinstance(sentinel, RedisSentinelBus)
