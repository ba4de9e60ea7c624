#!/usr/bin/env python3
"""Writes the seed corpus for the blk_request target.

Input layout (see vhost_tap::blk::request::fuzz_parse): one byte naming the
head descriptor, 16 descriptors of 16 bytes (addr u64, len u32, flags u16,
next u16, little endian), then bytes copied to guest address 0x4000.
"""
import os
import struct

NEXT, WRITE, INDIRECT = 1, 2, 4
OUT = os.path.join(os.path.dirname(__file__), "corpus", "blk_request")


def desc(addr, ln, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, ln, flags, nxt)


def seed(name, descs, tail=b"", head=0):
    table = b"".join(descs).ljust(256, b"\0")
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes([head]) + table + tail)


def hdr(t, sector):
    return struct.pack("<IIQ", t, 0, sector)


os.makedirs(OUT, exist_ok=True)
rw = lambda t, w: [desc(0x4000, 16, NEXT, 1), desc(0x5000, 512, (WRITE if w else 0) | NEXT, 2), desc(0x6000, 1, WRITE)]
seed("read", rw(0, True), hdr(0, 5))
seed("write", rw(1, False), hdr(1, 7))
seed("flush", [desc(0x4000, 16, NEXT, 1), desc(0x6000, 1, WRITE)], hdr(4, 0))
seed("get_id", [desc(0x4000, 16, NEXT, 1), desc(0x5000, 20, WRITE | NEXT, 2), desc(0x6000, 1, WRITE)], hdr(8, 0))
rng = struct.pack("<QII", 8, 16, 0)
seed("discard", [desc(0x4000, 32, NEXT, 1), desc(0x6000, 1, WRITE)], hdr(11, 0) + rng)
seed("write_zeroes", [desc(0x4000, 32, NEXT, 1), desc(0x6000, 1, WRITE)], hdr(13, 0) + rng)
seed("unsupported", [desc(0x4000, 16, NEXT, 1), desc(0x6000, 1, WRITE)], hdr(99, 0))
seed("header_split", [desc(0x4000, 8, NEXT, 1), desc(0x4008, 8, NEXT, 2), desc(0x6000, 1, WRITE)], hdr(0, 1))
seed("loop", [desc(0x4000, 16, NEXT, 1), desc(0x5000, 16, NEXT, 0)], hdr(0, 0))
seed("self_loop", [desc(0x4000, 16, NEXT, 0)], hdr(0, 0))
seed("out_of_range", [desc(0x4000, 16, NEXT, 1), desc(0xFFFF_FFFF_F000, 4096, WRITE | NEXT, 2), desc(0x6000, 1, WRITE)], hdr(0, 0))
seed("wrong_order", [desc(0x4000, 16, NEXT, 1), desc(0x6000, 1, WRITE | NEXT, 2), desc(0x5000, 512)], hdr(1, 0))
seed("wrong_direction", rw(0, False), hdr(0, 0))
seed("no_status", [desc(0x4000, 16)], hdr(0, 0))
seed("oversized", [desc(0x4000, 16, NEXT, 1), desc(0x5000, 0xFFFF_FFF0, WRITE | NEXT, 2), desc(0x6000, 1, WRITE)], hdr(0, 0))
seed("next_out_of_table", [desc(0x4000, 16, NEXT, 200)], hdr(0, 0))
seed("head_out_of_table", rw(0, True), hdr(0, 0), head=200)
# Indirect table at 0x4100 with three descriptors.
ind = desc(0x4000, 16, NEXT, 1) + desc(0x5000, 512, WRITE | NEXT, 2) + desc(0x6000, 1, WRITE)
seed("indirect", [desc(0x4100, 48, INDIRECT)], hdr(0, 3).ljust(0x100, b"\0") + ind)
seed("indirect_bad_len", [desc(0x4100, 47, INDIRECT)], hdr(0, 3).ljust(0x100, b"\0") + ind)
seed("empty", [], b"")
with open(os.path.join(OUT, "truncated"), "wb") as f:
    f.write(b"\x00\x01\x02")
