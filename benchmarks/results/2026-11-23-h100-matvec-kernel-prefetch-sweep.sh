R=$PWD; mkdir -p /tmp/oato && (cd /tmp/oato && tar xJf $R/.device/lcpp.tar.xz); export GGML_LIB=$R/.device/cpulib
for pf in 1024 2048 3072 4096 6144; do for lvl in avx512 avx2; do
  echo "# pf=$pf level=$lvl"; OATO_CPU_MATVEC=$lvl CFLAGS_EXTRA=-DOATO_PREFETCH_BYTES=$pf bash benchmarks/matvec_kernel.sh 1.5 8,16 4 | grep -v '"read"\|machine'
done; done
for hint in _MM_HINT_T1 _MM_HINT_T2 _MM_HINT_NTA; do echo "# pf=3072 hint=$hint"; CFLAGS_EXTRA="-DOATO_PREFETCH_BYTES=3072 -DOATO_PREFETCH_HINT=$hint" bash benchmarks/matvec_kernel.sh 1.5 8,16 4 | grep -v 'machine\|check'; done
