// SPDX-License-Identifier: (Apache-2.0 OR GPL-2.0)
// Changed-block tracker: reports every non-read block I/O to the migrated disks.
//
// Two tracepoints, both keyed by the whole disk's device number (a partition's bio is remapped
// to its disk before either fires):
//   block_bio_queue:   a bio is submitted (the earliest sign of a change);
//   block_rq_complete: a request completed. A write queued before the sync pass began but
//                      completed after it is reported again here, so a pass that read the old
//                      data still finds the chunk dirty in the next pass.
// Events go through a ring buffer; when it is full the write cannot be recorded, so the
// `lost` counter tells user space to treat every disk as wholly changed.
//
// Built by `agent/src/cbt/build-bpf.sh` (clang -target bpf); the object is committed and CI
// rebuilds it and compares.

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

// Tracepoint field offsets (/sys/kernel/tracing/events/block/*/format); user space checks the
// running kernel's layout against these before it attaches.
#define DEV_OFF 8
#define SECTOR_OFF 16
#define NR_SECTOR_OFF 24
#define BIO_RWBS_OFF 28
#define RQ_RWBS_OFF 34

// One disk slot per migrated disk, up to this many.
#define MAX_DISKS 64

struct event {
	__u32 disk;
	__u32 nr_sector;
	__u64 sector;
};

// Device number (the tracepoints' `dev`: major << 20 | minor) to the disk's slot.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_DISKS);
	__type(key, __u32);
	__type(value, __u32);
} disks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 22);
} events SEC(".maps");

// [0]: events lost to a full ring buffer; then per slot: I/Os of any kind seen by
// block_bio_queue (1 + 2 * slot) and by block_rq_complete (2 + 2 * slot), which user space
// uses to check that a disk's I/O shows up under its own device at all.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 + 2 * MAX_DISKS);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline int track(void *ctx, int rwbs_off, __u32 hook)
{
	__u32 dev = *(__u32 *)(ctx + DEV_OFF);
	__u32 *slot = bpf_map_lookup_elem(&disks, &dev);
	if (!slot)
		return 0;
	__u32 key = 1 + 2 * (*slot & (MAX_DISKS - 1)) + hook;
	__u64 *seen = bpf_map_lookup_elem(&stats, &key);
	if (seen)
		__sync_fetch_and_add(seen, 1);
	char op = *(char *)(ctx + rwbs_off);
	__u32 nr = *(__u32 *)(ctx + NR_SECTOR_OFF);
	// Reads change nothing; a flush carries no sectors. Everything else (writes, discards,
	// write-zeroes, anything the kernel may add) counts as a change.
	if (op == 'R' || nr == 0)
		return 0;
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&stats, &zero);
		if (lost)
			__sync_fetch_and_add(lost, 1);
		return 0;
	}
	e->disk = *slot;
	e->nr_sector = nr;
	e->sector = *(__u64 *)(ctx + SECTOR_OFF);
	// User space polls; waking it per write would cost the writer.
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	return 0;
}

SEC("tracepoint/block/block_bio_queue")
int bio_queue(void *ctx)
{
	return track(ctx, BIO_RWBS_OFF, 0);
}

SEC("tracepoint/block/block_rq_complete")
int rq_complete(void *ctx)
{
	return track(ctx, RQ_RWBS_OFF, 1);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
