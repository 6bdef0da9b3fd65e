# Source on the GPU machine from the repository root: sluice's extra wheels into /tmp/site,
# FlashAttention-4 (whichever part of .fa4 travelled with this call) into /tmp/fa4, and a
# sitecustomize that adds /tmp/fa4 as a site directory (its .pth files matter) to every process.
mkdir -p /tmp/site /tmp/fa4
[ -f /tmp/site/.done ] || { pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl && touch /tmp/site/.done; }
for part in .fa4/part*.tar.xz; do [ -f "$part" ] && tar -xJf "$part" -C /tmp/fa4; done
printf 'import site\nsite.addsitedir("/tmp/fa4")\n' > /tmp/site/sitecustomize.py
export PYTHONPATH=/tmp/site:.
