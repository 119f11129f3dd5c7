# The settings PROTOCOL.md fixes, sourced by run.sh and run_more.sh: $shared is the shared folder, $here this one.
common=(--model_name cifar_resnet20 --pretrained_weights "$shared/models/cifar_resnet20/resnet20-12fca82f.th"
        --dataset_name "$shared/data/cifar10" --fractions 0.1 --epochs 4 --selection_interval 2 --batch_size 128
        --lr 5e-4 --scale 0.6 1 --color_jitter 0 --score_cache_dir "${TMPDIR:-/tmp}/acs_score_cache")
w2=(--bits 2 --float_activations --output_dir "$here/w2a32")
w4=(--bits 4 --output_dir "$here/w4a4")
all=(random_dynamic acs "acs@reuse=1,pool=0.2" "random_dynamic@f=0.3")
