"""Images: what a run clones, built once per image and sealed.

    layer.py        the OS layer a recipe builds (mmdebstrap, unprivileged), cached
    cloud.py        the OS layer made from a cloud image: its kernel and modules read without booting it
    initramfs.py    the small initramfs clones boot with
    requirements.py the requirements file, checked before anything is built
    seed.py         cloud-init's NoCloud seed for the provisioning boot
    provision.py    provisioning: the line of steps from layer to sealed template
    sealcheck.py    the template checked without booting it (sshd, its config, vmiso's files)
    inventory.py    what runs at every Python start, read from the template
    store.py        the image store: templates, manifests, checked digests, owners

No module here imports libvirt: the connection is handed in.
"""
