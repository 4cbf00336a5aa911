/* llama.cpp's own best case on kvloom's benchmark workloads, in C against libllama (no Python per step):
 * N sequences of P prompt tokens (read from a file of int32 ids), all prompts in one llama_batch (which
 * llama_decode splits into ubatches), then G - 1 steps of one token per sequence; greedy argmax in C over
 * each sequence's logits, as the engines compared with it sample. This is the shape of llama.cpp's
 * batched-bench plus the argmax. bench/compare.py builds it against the llama-cpp-python venv's libllama
 * (engines llamacpp-c-*) and reads its RESULT line: the best of `reps` runs (memory cleared between).
 *
 *     llamacpp_batched MODEL.gguf PROMPTS.i32 N P G THREADS [REPS]
 */
#include <llama.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int argmax(const float *l, int n) {
    int best = 0;
    for (int v = 1; v < n; v++)
        if (l[v] > l[best]) best = v;
    return best;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPTS.i32 N P G THREADS [REPS]\n", argv[0]);
        return 2;
    }
    const int N = atoi(argv[3]), P = atoi(argv[4]), G = atoi(argv[5]), threads = atoi(argv[6]);
    const int reps = argc > 7 ? atoi(argv[7]) : 3;
    int *prompts = malloc(sizeof(int) * N * P);
    FILE *f = fopen(argv[2], "rb");
    if (!f || fread(prompts, sizeof(int), (size_t)N * P, f) != (size_t)N * P) {
        fprintf(stderr, "cannot read %d x %d token ids from %s\n", N, P, argv[2]);
        return 1;
    }
    fclose(f);
    llama_backend_init();
    double t_load = now();
    struct llama_model_params mparams = llama_model_default_params();
    /* KVLOOM_LLAMACPP_EXTRA_BUFTS=0: no repacked / AMX weight buffers (llama.cpp 0.3.36's crash on
       Gemma 3 with them on a Sapphire Rapids VM) */
    const char *extra = getenv("KVLOOM_LLAMACPP_EXTRA_BUFTS");
    if (extra && extra[0] == '0') mparams.use_extra_bufts = false;
    struct llama_model *model = llama_model_load_from_file(argv[1], mparams);
    if (!model) return 1;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = N * (P + G) + 16;
    cp.n_batch = N * P;
    cp.n_seq_max = N;
    cp.n_threads = cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    t_load = now() - t_load;
    const int V = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_batch batch = llama_batch_init(N * P, 0, 1);
    int *next = malloc(sizeof(int) * N);
    double best_total = 1e30, best_prefill = 0, best_decode = 1e30;
    for (int rep = 0; rep < reps; rep++) {
        llama_memory_clear(llama_get_memory(ctx), true);
        const double t0 = now();
        batch.n_tokens = 0;
        for (int s = 0; s < N; s++)
            for (int p = 0; p < P; p++) {
                const int i = batch.n_tokens++;
                batch.token[i] = prompts[s * P + p];
                batch.pos[i] = p;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = s;
                batch.logits[i] = p == P - 1;
            }
        if (llama_decode(ctx, batch)) return 1;
        const double t1 = now();
        for (int g = 0; g < G; g++) {
            for (int s = 0; s < N; s++) next[s] = argmax(llama_get_logits_ith(ctx, g == 0 ? (s + 1) * P - 1 : s), V);
            if (g == G - 1) break;
            batch.n_tokens = 0;
            for (int s = 0; s < N; s++) {
                const int i = batch.n_tokens++;
                batch.token[i] = next[s];
                batch.pos[i] = P + g;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = s;
                batch.logits[i] = 1;
            }
            if (llama_decode(ctx, batch)) return 1;
        }
        const double t2 = now();
        if (t2 - t0 < best_total) best_total = t2 - t0, best_prefill = t1 - t0;
        if (t2 - t1 < best_decode) best_decode = t2 - t1;
    }
    printf("RESULT {\"engine\": \"llamacpp-c\", \"load_s\": %.4f, \"elapsed_s\": %.4f, \"prefill_s\": %.4f, "
           "\"output_tok_s\": %.3f, \"decode_ms\": %.4f, \"decode_tok_s\": %.3f}\n",
           t_load, best_total, best_prefill, N * G / best_total, best_decode / (G - 1) * 1e3,
           N * (G - 1) / best_decode);
    return 0;
}
