# Source on the GPU machine from the repository root: sluice's extra wheels into /tmp/site,
# FlashAttention-4 into /tmp/fa4, and a sitecustomize that adds /tmp/fa4 as a site directory
# (its .pth files matter) to every process.
#
# FlashAttention-4 travels in three calls made within seconds of each other (a warm machine
# keeps /tmp for ~30 s; a call carries at most 64 MB with the tree): part1.tar.xz, then the two
# halves of part2 made here with `split -b 24M .fa4/part2.tar.xz .fa4/p2.` (carry p2.aa, then
# p2.ab). Each call sources this file; it unpacks whatever arrived.
mkdir -p /tmp/site /tmp/fa4 /tmp/fa4parts
[ -f /tmp/site/.done ] || { pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl && touch /tmp/site/.done; }
[ -f .fa4/part1.tar.xz ] && tar -xJf .fa4/part1.tar.xz -C /tmp/fa4
[ -f .fa4/p2.aa ] && cp .fa4/p2.aa /tmp/fa4parts/
[ -f .fa4/p2.ab ] && cat /tmp/fa4parts/p2.aa .fa4/p2.ab | tar -xJ -C /tmp/fa4
printf 'import site\nsite.addsitedir("/tmp/fa4")\n' > /tmp/site/sitecustomize.py
export PYTHONPATH=/tmp/site:.
