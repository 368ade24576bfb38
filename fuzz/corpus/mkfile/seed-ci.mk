# Reprise's standard include: the well-known targets, with defaults.
# Include it first in a repository's mkfile:
#
#	</usr/lib/reprise/ci.mk
#	CONTAINERIMAGE=localhost/myproject-test
#	base-image:V:
#		podman build -t $CONTAINERIMAGE .
#	test:V:
#		./run-tests
#
# The image carries this file at /usr/lib/reprise/ci.mk, and the test
# container sees it at the same path.

CI=/var/run/ci

# Called before every job, as root in the guest, from the repository root.
prepare-runtime:V: $CI/env/CONTAINERIMAGE

# The image the tests run in, named by $CONTAINERIMAGE.
$CI/env/CONTAINERIMAGE: base-image
	mkdir -p $CI/env
	echo $CONTAINERIMAGE > $target

# Builds the container image; a repository's own recipe replaces this one.
base-image:V:
	:

# Default artifact rule: the file of the same path in the repository.
$CI/artifacts/%: %
	mkdir -p `dirname $target`
	cp $stem $target

# Runs last; does nothing unless a repository says otherwise.
post-test:V:
	:
