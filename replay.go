// SPDX-License-Identifier: Apache-2.0

package main

// Journal replay and the queue's limit (docs/design.md §12): the jobs a journal replay queues again
// were accepted before the restart. max_queued limits what the daemon accepts, not what it
// already owes, so replayed jobs are queued whatever the limit: a configuration with a
// smaller max_queued, or more journaled jobs than the queue held (jobs that were running),
// must not make the daemon discard accepted work. Until the queue drains below max_queued
// again, new requests get busy, as with any full queue.

// addReplayed is queueState.add for a replayed background job, over max_queued if need be.
func (qs *queueState) addReplayed(keys []jobKey, priority int, now int64) (merged int, err error) {
	limit := qs.max
	qs.max = max(limit, qs.queued()+len(keys))
	defer func() { qs.max = limit }()
	return qs.add(keys, priority, true, nil, now)
}
