// oatoplan: overlapped weight streaming for ggml's scheduler (included by ggml-backend.cpp, patches/0005).
//
// With op offload, a large batch runs every op on the GPU, and each weight that lives in host memory is copied to
// the GPU right before its op. Stock ggml does that copy synchronously (ggml_backend_tensor_copy after a
// ggml_backend_synchronize of the GPU), so the copy and the GPU's compute add up. Here such weights are uploaded
// into a ring of staging slots in VRAM by a second backend instance on the same device (its own stream), while the
// compute stream works on earlier splits:
//
//   copy stream:    wait done[k] -> H2D copy weight -> slot k -> record ready[k]
//   compute stream: wait ready[k] -> the split's kernels read slot k -> record done[k]
//
// done[k] orders a slot's reuse after its last reader, ready[k] orders each op after its upload. Only the GPU waits:
// with pinned host weights (oatoplan's plans pin them) the host thread never blocks, so the copy stream runs up to
// n_slots weights ahead of the compute stream (from pageable memory, cudaMemcpyAsync returns only once the data is
// staged). The kernels and the bytes they read are the same as without streaming, only the address differs.
// CUDA/HIP backends only: each backend instance has its own stream and waits on another instance's events there.
//
// Switches (read when a scheduler is created): OATO_STREAM=0 turns it off; OATO_STREAM_SLOTS (2..16, default 3)
// slots; OATO_STREAM_SLOT_BYTES the size of one slot (default: the largest streamed weight of the first graph that
// has one; a larger weight then takes the stock path). oato_sched_stream_stats() counts what happened.

#pragma once

#include "ggml-backend.h"
#include "ggml-impl.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <vector>

#define OATO_STREAM_MAX_SLOTS 16
#define OATO_STREAM_MAX_BACKENDS 16

// process-wide counters: [0] weights streamed, [1] bytes streamed, [2] host weights of GPU splits that took the stock
// copy while streaming was on, [3] VRAM bytes of the staging rings now allocated
static std::atomic<int64_t> oato_stream_counters[4];

extern "C" {
GGML_API void oato_sched_stream_stats(int64_t * out);
GGML_API void oato_sched_stream_stats_reset(void);
}

void oato_sched_stream_stats(int64_t * out) {
    for (int i = 0; i < 4; i++) {
        out[i] = oato_stream_counters[i].load();
    }
}

void oato_sched_stream_stats_reset(void) {
    for (int i = 0; i < 3; i++) {   // [3] is a level, not a count
        oato_stream_counters[i] = 0;
    }
}

struct oato_stream_ring {
    bool failed = false;                      // could not set up on this backend: stock copies
    ggml_backend_t copy_backend = nullptr;    // a second backend on the same device: its own stream
    ggml_backend_buffer_t buffer = nullptr;   // n_slots * slot_bytes of VRAM
    size_t slot_bytes = 0;
    int n_slots = 0;
    int next = 0;                             // round robin over the slots
    ggml_backend_event_t ready[OATO_STREAM_MAX_SLOTS] = {};
    ggml_backend_event_t done[OATO_STREAM_MAX_SLOTS] = {};
};

struct oato_stream {
    bool enabled = true;
    bool measuring = false;                   // inside ggml_backend_sched_reserve_size: allocate nothing
    int8_t backend_ok[OATO_STREAM_MAX_BACKENDS];   // -1 not asked yet (asking the device is slow), 0 no, 1 yes
    size_t measured_ring_bytes[OATO_STREAM_MAX_BACKENDS];   // what reserve_size adds: the ring it would allocate
    int n_slots = 3;
    size_t slot_bytes = 0;                    // 0: sized by the first graph
    oato_stream_ring rings[OATO_STREAM_MAX_BACKENDS];
    std::unordered_map<const ggml_tensor *, int> slot_of;   // input copy of the current graph -> slot
};

static oato_stream * oato_stream_new(void) {
    oato_stream * st = new oato_stream();
    for (int b = 0; b < OATO_STREAM_MAX_BACKENDS; b++) {
        st->backend_ok[b] = -1;
        st->measured_ring_bytes[b] = 0;
    }
    const char * on = getenv("OATO_STREAM");
    st->enabled = !(on && on[0] == '0');
    const char * slots = getenv("OATO_STREAM_SLOTS");
    if (slots) {
        const int n = atoi(slots);
        st->n_slots = n < 2 ? 2 : (n > OATO_STREAM_MAX_SLOTS ? OATO_STREAM_MAX_SLOTS : n);
    }
    const char * bytes = getenv("OATO_STREAM_SLOT_BYTES");
    if (bytes) {
        st->slot_bytes = (size_t) strtoull(bytes, nullptr, 10);
    }
    return st;
}

static void oato_stream_ring_free(oato_stream_ring & ring) {
    if (ring.copy_backend) {
        ggml_backend_synchronize(ring.copy_backend);
    }
    for (int k = 0; k < OATO_STREAM_MAX_SLOTS; k++) {
        if (ring.ready[k]) {
            ggml_backend_event_free(ring.ready[k]);
        }
        if (ring.done[k]) {
            ggml_backend_event_free(ring.done[k]);
        }
    }
    if (ring.buffer) {
        oato_stream_counters[3] -= (int64_t) ggml_backend_buffer_get_size(ring.buffer);
        ggml_backend_buffer_free(ring.buffer);
    }
    if (ring.copy_backend) {
        ggml_backend_free(ring.copy_backend);
    }
    ring = oato_stream_ring();
}

// The scheduler's backends may be gone already (llama_context frees them first, after synchronizing): touch only
// our own copy backends. Freeing the ring's device memory waits for the device.
static void oato_stream_free(oato_stream * st) {
    if (!st) {
        return;
    }
    for (int b = 0; b < OATO_STREAM_MAX_BACKENDS; b++) {
        oato_stream_ring_free(st->rings[b]);
    }
    delete st;
}

// A weight in a host buffer: what op offload copies to the GPU for every large batch (not a memory-fit probe's
// dummy weight, which has no data).
static bool oato_stream_is_host_weight(const ggml_tensor * t) {
    return t->buffer != nullptr && t->data != nullptr && t->view_src == nullptr &&
           ggml_backend_buffer_get_usage(t->buffer) == GGML_BACKEND_BUFFER_USAGE_WEIGHTS &&
           ggml_backend_buffer_is_host(t->buffer);
}

// A CUDA/HIP GPU backend with async copies and events (asked once per scheduler backend: the CUDA backend answers
// through several device-property calls).
static bool oato_stream_backend_ok(oato_stream * st, int b, ggml_backend_t backend) {
    if (b >= OATO_STREAM_MAX_BACKENDS) {
        return false;
    }
    if (st->backend_ok[b] < 0) {
        ggml_backend_dev_t dev = ggml_backend_get_device(backend);
        const char * name = ggml_backend_name(backend);
        bool ok = dev != nullptr && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU &&
                  (strncmp(name, "CUDA", 4) == 0 || strncmp(name, "ROCm", 4) == 0 || strncmp(name, "HIP", 3) == 0);
        if (ok) {
            ggml_backend_dev_props props;
            ggml_backend_dev_get_props(dev, &props);
            ok = props.caps.async && props.caps.events;
        }
        st->backend_ok[b] = ok ? 1 : 0;
    }
    return st->backend_ok[b] == 1;
}

// Set up backend b's ring with slots of slot_bytes; false (and stock copies from then on) if the device cannot.
static bool oato_stream_ring_init(oato_stream * st, int b, ggml_backend_t backend, ggml_backend_buffer_type_t buft,
                                  size_t slot_bytes) {
    oato_stream_ring & ring = st->rings[b];
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    const size_t align = ggml_backend_buft_get_alignment(buft);
    ring.slot_bytes = (slot_bytes + align - 1) / align * align;
    ring.n_slots = st->n_slots;
    ring.copy_backend = ggml_backend_dev_init(dev, nullptr);
    ring.buffer = ring.copy_backend ? ggml_backend_buft_alloc_buffer(buft, ring.slot_bytes * ring.n_slots) : nullptr;
    bool ok = ring.buffer != nullptr;
    if (ok) {
        oato_stream_counters[3] += (int64_t) ggml_backend_buffer_get_size(ring.buffer);
    }
    for (int k = 0; ok && k < ring.n_slots; k++) {
        ring.ready[k] = ggml_backend_event_new(dev);
        ring.done[k] = ggml_backend_event_new(dev);
        ok = ring.ready[k] && ring.done[k];
    }
    if (!ok) {
        GGML_LOG_WARN("%s: oato weight streaming: could not set up %d slots of %.1f MiB on %s; weights are copied "
                      "the stock way\n", __func__, st->n_slots, ring.slot_bytes / 1048576.0, ggml_backend_name(backend));
        oato_stream_ring_free(ring);
        ring.failed = true;
        return false;
    }
    // the compute buffer holds no weight copies for these tensors any more; like it, the ring is compute memory
    ggml_backend_buffer_set_usage(ring.buffer, GGML_BACKEND_BUFFER_USAGE_COMPUTE);
    ggml_backend_buffer_clear(ring.buffer, 0);
    GGML_LOG_INFO("%s: oato weight streaming: %d slots x %.2f MiB on %s\n", __func__, ring.n_slots,
                  ring.slot_bytes / 1048576.0, ggml_backend_name(backend));
    return true;
}

// Before the compute stream runs a split: upload one streamed weight into its slot.
static void oato_stream_upload(oato_stream * st, int b, int k, ggml_backend_t split_backend, const ggml_tensor * input,
                               ggml_tensor * input_cpy) {
    oato_stream_ring & ring = st->rings[b];
    const size_t n_bytes = ggml_nbytes(input);
    ggml_backend_event_wait(ring.copy_backend, ring.done[k]);       // the slot's last reader has finished
    ggml_backend_tensor_set_async(ring.copy_backend, input_cpy, input->data, 0, n_bytes);
    ggml_backend_event_record(ring.ready[k], ring.copy_backend);
    ggml_backend_event_wait(split_backend, ring.ready[k]);          // the split's kernels run after the upload
    oato_stream_counters[0] += 1;
    oato_stream_counters[1] += (int64_t) n_bytes;
}

// After the compute stream has been given a split: its slots are free once it has run.
static void oato_stream_release(oato_stream * st, int b, const std::vector<int> & slots, ggml_backend_t split_backend) {
    for (int k : slots) {
        ggml_backend_event_record(st->rings[b].done[k], split_backend);
    }
}
