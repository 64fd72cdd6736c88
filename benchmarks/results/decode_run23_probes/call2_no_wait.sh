set -u
export PYTHONUNBUFFERED=1
run() { timeout 150 python3 .devwork/s11/l2persist.py mamba2-130m,mamba2-370m "64:evict_last:evict_first" 0 2>&1 | grep -v Warn | grep mamba2; }
echo "== default"; run
cp kernels/pdl.py /tmp/pdl.py.orig
python3 - <<'PY'
p='kernels/pdl.py'; s=open(p).read()
old="""    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if USE_PDL == 1:"""
assert s.count(old)==1
s=s.replace(old,"""    if USE_PDL:
        if USE_PDL == 1:""")
open(p,'w').write(s)
PY
echo "== no wait (wrong results: launches overlap freely)"; run
cp /tmp/pdl.py.orig kernels/pdl.py
echo "== default again"; run
echo "done at ${SECONDS}s"
